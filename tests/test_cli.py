"""The `lowbit` command: contract fields, exit codes, atomic outputs."""

import json
import os
import subprocess
import sys

import pytest
from conftest import quantize_args
from conftest import run_cli as run


def test_quantize_writes_the_report(tiny_model_dir, sample_text_file, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run(quantize_args(tiny_model_dir, sample_text_file, "--scheme", "W4A8KV4", "--out", str(out)), capsys)
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("lowbit_version", "model", "scheme", "transform", "algorithm", "eval", "fp", "quantized", "seconds"):
        assert key in report
    assert report["scheme"] == "W4A8KV4" and report["transform"] == "none" and report["algorithm"] == "rtn"
    assert report["eval"]["windows"] == 3 and report["eval"]["seq_len"] == 32 and report["eval"]["tokens"] == 3 * 31
    assert report["quantized"]["ppl"] > 0 and report["fp"]["ppl"] > 0
    assert report["quantized"]["size_bytes"] < report["fp"]["size_bytes"]
    assert report["quantized"]["ops"] < report["fp"]["ops"]
    assert "perplexity" in (out / "report.md").read_text() and "W4A8KV4" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "sample.txt", "tiny-llama"]  # no temp leftovers
    assert sorted(p.name for p in out.iterdir()) == ["model", "report.json", "report.md"]


def test_existing_out_is_refused_unless_overwrite(tiny_model_dir, sample_text_file, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, _, err = run(quantize_args(tiny_model_dir, sample_text_file, "--out", str(out)), capsys)
    assert code == 2 and "exists; pass --overwrite" in err and err.count("\n") == 1
    assert (out / "keep.txt").read_text() == "user data"
    code, _, _ = run(quantize_args(tiny_model_dir, sample_text_file, "--out", str(out), "--overwrite"), capsys)
    assert code == 0 and (out / "report.json").is_file() and not (out / "keep.txt").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--scheme", "W17A16"], "weight bits must be 2-8"),
        (["--scheme", "W0A16"], "weight bits must be 2-8"),
        (["--scheme", "W1A16"], "weight bits must be 2-8"),
        (["--scheme", "W4g48A16"], "group size 48 does not divide"),
        (["--scheme", "Wmxfp4g32A16"], "takes no group size (g<N>): the format fixes its block size"),
        (["--scheme", "Wfp4A16"], "cannot parse scheme"),
        (["--scheme", "W16A16KVmxfp4"], "32-value blocks of mxfp4 does not divide head_dim=16"),
        (["--scheme", "Wnvfp4A16", "--transform", "rotate", "--rotation-block", "48"], "block Hadamard of size 48 does not divide"),
        (["--rotation-block", "1"], "--rotation-block must be at least 2"),
        (["--seq-len", "100000"], "longer than the model's context (256 tokens)"),
        (["--windows", "x"], "--windows must be"),
        (["--recipe", "nope"], "unknown recipe"),
        (["--transform", "twist"], "unknown transform"),
        (["--scheme", "W8A8s", "--calib", "missing.txt"], "text file not found"),
    ],
)
def test_bad_input_exits_2_with_one_line(tiny_model_dir, sample_text_file, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    code, _, err = run(quantize_args(tiny_model_dir, sample_text_file, "--out", str(out), *extra), capsys)
    assert code == 2
    assert message in err and err.startswith("lowbit: error:") and err.count("\n") == 1
    assert not out.exists()


def test_bad_model_and_data(tiny_model_dir, tmp_path, capsys):
    code, _, err = run(["-q", "quantize", "--model", "no-such-model"], capsys)
    assert code == 2 and "unknown model" in err
    code, _, err = run(["-q", "quantize", "--model", str(tiny_model_dir), "--data", str(tmp_path / "none.txt"), "--seq-len", "32"], capsys)
    assert code == 2 and "text file not found" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = run(["-q", "quantize", "--model", str(tiny_model_dir), "--data", str(empty), "--seq-len", "32"], capsys)
    assert code == 2 and "empty" in err


def test_static_scheme_with_calibration_file(tiny_model_dir, sample_text_file, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text(sample_text_file.read_text()[::-1])
    code, stdout, _ = run(
        quantize_args(tiny_model_dir, sample_text_file, "--scheme", "W8A8sKV8s", "--calib", str(calib), "--calib-samples", "2"),
        capsys,
    )
    assert code == 0 and "W8A8sKV8s" in stdout


def test_recipe_file(tiny_model_dir, sample_text_file, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("scheme: W4g32A8\nalgorithm: rtn\n")
    out = tmp_path / "run"
    code, _, _ = run(quantize_args(tiny_model_dir, sample_text_file, "--recipe", str(recipe), "--out", str(out)), capsys)
    assert code == 0 and json.loads((out / "report.json").read_text())["scheme"] == "W4g32A8KV16"
    recipe.write_text("scheme: W4A8\ncolour: blue\n")
    code, _, err = run(quantize_args(tiny_model_dir, sample_text_file, "--recipe", str(recipe)), capsys)
    assert code == 2 and "unknown keys colour" in err


def test_evaluate_and_info(tiny_model_dir, sample_text_file, capsys):
    code, out, _ = run(["-q", "evaluate", str(tiny_model_dir), "--data", str(sample_text_file), "--seq-len", "32", "--json"], capsys)
    report = json.loads(out)
    assert code == 0 and report["fp"]["ppl"] > 0 and "quantized" not in report
    code, out, _ = run(["-q", "info", "--model", str(tiny_model_dir), "--scheme", "W4A8KV4"], capsys)
    info = json.loads(out)
    assert code == 0 and info["family"] == "llama" and info["hidden_size"] == 64
    assert info["quantized_linear_count"] == 14 and info["kv_quantized"]
    assert "mlp.down_proj" in info["linears_per_layer"]


def test_formats_in_info_and_reports(tiny_model_dir, sample_text_file, tmp_path, capsys):
    code, out, _ = run(["-q", "info", "--model", str(tiny_model_dir), "--scheme", "Wnvfp4Afp8KV8"], capsys)
    info = json.loads(out)
    assert code == 0 and info["formats"]["weights"] == {"format": "nvfp4", "bits_per_value": 4.5}
    assert info["formats"]["activations"]["format"] == "fp8" and info["formats"]["keys"]["format"] == "int8"
    # 4 bits, an E4M3 scale per 16 values, one float32 scale per linear (64x64 and 64x128 / 128x64 here)
    assert 4.5 < info["bits_per_weight"] < 4.51
    code, _, err = run(["-q", "evaluate", str(tiny_model_dir), "--scheme", "Wmxfp4A16", "--int-kernels", "--seq-len", "32"], capsys)
    assert code == 2 and "integer formats only" in err and err.count("\n") == 1
    code, stdout, _ = run(quantize_args(tiny_model_dir, sample_text_file, "--scheme", "Wmxfp4A16", "--out", str(tmp_path / "r")), capsys)
    assert code == 0 and "weights mxfp4 (4.25 bits/value)" in stdout and "4.250 bits per weight" in stdout


def test_hub_id_offline_is_a_clear_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LOWBIT_CACHE": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "lowbit.cli", "-q", "info", "--model", "no-org/no-model"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "cannot load model 'no-org/no-model'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "extra",
    [
        ["--transform", "smooth", "--scheme", "W8A8KV8", "--alpha", "0.6"],
        ["--transform", "rotate", "--scheme", "W4A4KV4", "--random-hadamard"],
        ["--transform", "smoothrot", "--scheme", "W4A8KV4", "--smooth-all", "--alpha", "search", "--online-r1", "--no-fold-norms"],
        ["--recipe", "w4a4kv4-smoothrot-rtn"],
    ],
)
def test_transforms_from_the_cli(tiny_model_dir, sample_text_file, tmp_path, capsys, extra):
    calib = tmp_path / "calib.txt"
    calib.write_text(sample_text_file.read_text()[::-1])
    out = tmp_path / "run"
    args = quantize_args(tiny_model_dir, sample_text_file, "--calib", str(calib), "--calib-samples", "2", "--out", str(out), *extra)
    code, _, err = run(args, capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["transform"] == report["transform_args"]["kind"] != "none"
    if "--alpha" in extra and "search" in extra:
        assert report["transform_args"]["alphas"]  # one alpha per layer and group


@pytest.mark.parametrize(
    "extra, message", [(["--transform", "smooth", "--alpha", "1.5"], "alpha must be in"), (["--alpha", "x"], "alpha must be a number")]
)
def test_bad_transform_options(tiny_model_dir, sample_text_file, capsys, extra, message):
    code, _, err = run(quantize_args(tiny_model_dir, sample_text_file, *extra), capsys)
    assert code == 2 and message in err


def test_evaluate_refuses_a_run_folder_without_a_model(tiny_model_dir, sample_text_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(quantize_args(tiny_model_dir, sample_text_file, "--out", str(out), "--no-fp", "--no-save-model"), capsys)[0] == 0
    assert not (out / "model").exists()
    assert "fp" not in json.loads((out / "report.json").read_text())  # --no-fp: absent, not null
    code, _, err = run(["-q", "evaluate", str(out)], capsys)
    assert code == 2 and "run folder without a saved model" in err


@pytest.mark.parametrize(
    "extra",
    [
        ["--algorithm", "gptq", "--scheme", "W4g32A16", "--act-order", "--damp", "0.05"],
        ["--algorithm", "awq", "--scheme", "W4A8KV8", "--calib-dtype", "bfloat16"],
        ["--recipe", "w4a4kv4-rotate-gptq"],
        ["--recipe", "w8a8-smoothquant-gptq"],
    ],
)
def test_calibrated_algorithms_from_the_cli(tiny_model_dir, sample_text_file, tmp_path, capsys, extra):
    calib = tmp_path / "calib.txt"
    calib.write_text(sample_text_file.read_text()[::-1])
    out = tmp_path / "run"
    args = quantize_args(
        tiny_model_dir, sample_text_file, "--calib", str(calib), "--calib-samples", "4", "--calib-seq-len", "16", "--out", str(out), *extra
    )
    code, stdout, err = run(args, capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["algorithm"] in ("gptq", "awq")
    assert report["calibration"]["samples"] == 4 and report["calibration"]["seq_len"] == 16
    assert len(report["layer_errors"]) == 2 and report["peak_rss_bytes"] > 0
    assert "Relative output error" in stdout
    if "--act-order" in extra:
        assert report["algorithm_args"]["act_order"] and report["algorithm_args"]["damp"] == 0.05
    assert report["calibration"]["dtype"] == ("bfloat16" if "--calib-dtype" in extra else "float32")


def test_data_free_calibration_from_the_cli(tiny_model_dir, sample_text_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = quantize_args(
        tiny_model_dir,
        sample_text_file,
        "--algorithm",
        "gptq",
        "--scheme",
        "W4A16",
        "--calib",
        "generated",
        "--calib-samples",
        "2",
        "--calib-seq-len",
        "12",
        "--out",
        str(out),
    )
    code, _, err = run(args, capsys)
    assert code == 0, err
    assert json.loads((out / "report.json").read_text())["calibration"]["data"] == "generated"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--act-order"], "act_order: not a setting of algorithm 'rtn'"),
        (["--algorithm", "awq", "--set", "damp=0.1"], "damp: not a setting of algorithm 'awq'"),
        (["--algorithm", "gptq", "--set", "damp=abc"], "damp must be a number"),
        (["--algorithm", "gptq", "--set", "act_order=maybe"], "act_order must be true/false"),
        (["--set", "nokey"], "--set takes KEY=VALUE"),
        (["--algorithm", "gptq", "--calib-samples", "100000"], "fewer than the 100000 samples requested"),
        (["--algorithm", "gptq", "--device", "nonsense"], "is not usable here"),
        (["--algorithm", "gptq", "--damp", "2"], "damping must be in"),
        (["--algorithm", "gptq", "--calib-seq-len", "1"], "--calib-seq-len must be at least 2"),
        (["--algorithm", "magic"], "unknown algorithm"),
    ],
)
def test_bad_algorithm_options(tiny_model_dir, sample_text_file, capsys, extra, message):
    code, _, err = run(quantize_args(tiny_model_dir, sample_text_file, *extra), capsys)
    assert code == 2 and message in err, err


def test_quantize_never_modifies_the_model_files(tiny_model_dir, sample_text_file, tmp_path, capsys):
    """The job quantizes in place into memory-mapped weights: copy-on-write must keep the files intact."""
    import hashlib

    def digest():
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tiny_model_dir.iterdir()) if p.is_file()}

    before = digest()
    calib = tmp_path / "calib.txt"
    calib.write_text(sample_text_file.read_text()[::-1])
    for extra in (
        ["--scheme", "W4A8KV4"],
        ["--algorithm", "gptq", "--scheme", "W3g32A16", "--calib", str(calib), "--calib-samples", "4", "--calib-seq-len", "16"],
    ):
        code, _, err = run(quantize_args(tiny_model_dir, sample_text_file, *extra), capsys)
        assert code == 0, err
    assert digest() == before


@pytest.mark.parametrize(
    "extra",
    [["--scheme", "W4g16aA8KV4", "--transform", "rotate"], ["--recipe", "w4a8kv4-smoothrot-gptq", "--calib-samples", "4", "--calib-seq-len", "32"]],
)
def test_evaluate_a_saved_run_reproduces_its_perplexity(tiny_model_dir, sample_text_file, tmp_path, capsys, extra):
    """quantize --out saves the model; evaluate on the run folder (or its model folder) reloads it and
    gets the very perplexity quantize measured in memory (identical logits)."""
    out = tmp_path / "run"
    assert run(quantize_args(tiny_model_dir, sample_text_file, *extra, "--out", str(out), "--no-fp"), capsys)[0] == 0
    report = json.loads((out / "report.json").read_text())
    assert report["saved_model"]["bytes_on_disk"] == sum(p.stat().st_size for p in (out / "model").iterdir())
    for target in (out, out / "model"):
        code, stdout, _ = run(["-q", "evaluate", str(target), "--data", str(sample_text_file), "--seq-len", "32", "--windows", "3", "--json"], capsys)
        assert code == 0
        again = json.loads(stdout)
        assert again["quantized"]["ppl"] == report["quantized"]["ppl"] and again["scheme"] == report["scheme"]
        assert again["quantized"]["size_bytes"] == report["quantized"]["size_bytes"]


def test_evaluate_a_damaged_saved_run_exits_2(tiny_model_dir, sample_text_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(quantize_args(tiny_model_dir, sample_text_file, "--scheme", "W4A16", "--out", str(out), "--no-fp"), capsys)[0] == 0
    (out / "model" / "model.safetensors").write_bytes(b"truncated")
    code, _, err = run(["-q", "evaluate", str(out)], capsys)
    assert code == 2 and "corrupted" in err and len(err.strip().splitlines()) == 1
