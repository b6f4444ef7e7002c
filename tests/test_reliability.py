"""Careless, unlucky and hostile input: nothing runs code from a file, no finished run is lost or
replaced, every mistake is one `lowbit: error:` line with exit status 2 before the model loads
where it can be, and what a killed run leaves behind is cleaned up by the next one."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import quantize_args, tiny_model, word_tokenizer
from conftest import run_cli as run

import lowbit
from lowbit import UserError
from lowbit.files import OutputExistsError, sweep_stale, write_dir_atomically
from lowbit.io.description import CHECKSUM_KEY, description_checksum
from lowbit.io.native import CONFIG_FILE, read_config
from lowbit.report import RunOutput

SRC = Path(__file__).resolve().parents[1] / "src" / "lowbit"
LOWBIT = [sys.executable, "-m", "lowbit.cli"]


class Payload:
    """Unpickling this writes a marker file: the proof that a file's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


# ---------------------------------------------------------------- 1. no code from files


def test_the_source_never_unpickles():
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for needle in ("torch.load(", "pickle.load", "pickle.loads", "weights_only=False", "trust_remote_code=True"):
            assert needle not in text, f"{path}: {needle}"


def test_a_crafted_checkpoint_never_runs(tmp_path):
    from lowbit.qat import TrainConfig, train

    marker = tmp_path / "marker"
    checkpoints = tmp_path / "run.checkpoints"
    checkpoints.mkdir()
    (checkpoints / "checkpoint.pt").write_bytes(pickle.dumps(Payload(marker)))  # the old name, as a pickle
    teacher = tiny_model("llama")
    student = lowbit.quantize(teacher, "W4A16", trainable=True, progress=False)
    data = [torch.randint(0, 512, (10,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    config = TrainConfig(steps=1, batch_size=2, checkpoint_every=1)
    train(student, teacher, data, config, checkpoint_dir=checkpoints, progress=False)
    assert not marker.exists()
    (checkpoints / "checkpoint.safetensors").write_bytes(pickle.dumps(Payload(marker)))  # a pickle under the new name
    student = lowbit.quantize(teacher, "W4A16", trainable=True, progress=False)
    with pytest.raises(UserError, match="cannot be read"):
        train(student, teacher, data, TrainConfig(steps=2, batch_size=2, checkpoint_every=1), checkpoint_dir=checkpoints, progress=False)
    assert not marker.exists()


def test_pickled_data_shards_and_weights_are_refused(tmp_path):
    from lowbit.qat import load_dataset

    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"samples": 1, "shard_size": 1}))
    (data / "shard-00000.pt").write_bytes(pickle.dumps(Payload(tmp_path / "marker")))
    with pytest.raises(UserError, match="old format"):
        load_dataset(data)
    model_dir = tmp_path / "bin-model"  # a folder with pickled weights only
    model = tiny_model("llama")
    model.config.save_pretrained(model_dir)
    torch.save(model.state_dict(), model_dir / "pytorch_model.bin")
    word_tokenizer().save_pretrained(model_dir)
    with pytest.raises(UserError, match="never loads pickled weights"):
        lowbit.load_model(str(model_dir))
    assert not (tmp_path / "marker").exists()


# ---------------------------------------------------------------- 2. a finished run is never replaced


def test_a_second_writer_does_not_replace_a_finished_output(tmp_path):
    out = tmp_path / "run"
    with RunOutput(out, overwrite=False, save_model=False) as first:
        with RunOutput(out, overwrite=False, save_model=False) as second:  # both start while out does not exist
            first.finish({"model": "first"})
            with pytest.raises(OutputExistsError, match="created by another run"):
                second.finish({"model": "second"})
    assert json.loads((out / "report.json").read_text())["model"] == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporaries left
    with RunOutput(out, overwrite=True, save_model=False) as third:  # --overwrite replaces it, whole
        third.finish({"model": "third"})
    assert json.loads((out / "report.json").read_text())["model"] == "third"


@pytest.mark.slow
def test_two_concurrent_quantize_runs(tiny_model_dir, sample_text_file, tmp_path):
    """Two `lowbit quantize --out X` at once: one finishes, the other is refused; X is whole."""
    out = tmp_path / "run"
    args = [*LOWBIT, *quantize_args(tiny_model_dir, sample_text_file, "--out", str(out))]
    procs = [subprocess.Popen(args, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 2],), results
    refused = next(err for code, err in results if code == 2)
    assert ("created by another run" in refused or "exists" in refused) and refused.count("\n") == 1
    report = json.loads((out / "report.json").read_text())
    assert report["quantized"]["ppl"] > 0 and (out / "model" / CONFIG_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ---------------------------------------------------------------- 3. the saved description is checked


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "model"
    q = lowbit.quantize(tiny_model("llama"), "W4A8KV4", transform="rotate", progress=False)
    lowbit.save_quantized(q, path)
    return path


def _edit(path: Path, tmp_path: Path, change, resign: bool) -> Path:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    config = json.loads((copy / CONFIG_FILE).read_text())
    change(config)
    if resign:  # a careful editor recomputes the checksum: the fields are still checked one by one
        config[CHECKSUM_KEY] = description_checksum(config)
    (copy / CONFIG_FILE).write_text(json.dumps(config))
    return copy


def _set(keys, value):
    def change(config):
        node = config
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return change


def test_a_hand_edited_description_is_refused(saved, tmp_path):
    edited = _edit(saved, tmp_path, _set(["scheme", "weights", "bits"], 8), resign=False)
    with pytest.raises(UserError, match="checksum does not match its content"):
        lowbit.load_quantized(edited)


@pytest.mark.parametrize(
    "keys, value, needle",
    [
        (["files", "../outside.txt"], {"sha256": "0" * 64, "bytes": 1}, "not a plain name inside the folder"),
        (["files", "/etc/passwd"], {"sha256": "0" * 64, "bytes": 1}, "not a plain name inside the folder"),
        (["dtype"], "evil", "dtype 'evil' is not one of"),
        (["modules", "linears", "model.layers.0.__class__"], None, "the entry of model.layers.0.__class__"),
        (["modules", "linears", "model..layers"], {}, "module path 'model..layers'"),
        (["modules", "attention", "model.layers.0.self_attn", "key"], {"bits": "four"}, "bits must be an integer"),
        (["scheme", "weights", "symmetric"], "false", "symmetric must be true or false"),
        (["format_version"], True, "no valid format_version"),
        (["extra_field"], 1, "unknown fields extra_field"),
        (["aliases", "lm_head.weight"], "../../x", "tensor name"),
    ],
)
def test_every_field_of_the_description_is_checked(saved, tmp_path, keys, value, needle):
    edited = _edit(saved, tmp_path, _set(keys, value), resign=True)
    with pytest.raises(UserError, match=needle):
        lowbit.load_quantized(edited)


def test_a_module_path_the_model_lacks_is_refused(saved, tmp_path):
    def change(config):
        linears = config["modules"]["linears"]
        linears["model.layers.7.mlp.up_proj"] = linears.pop("model.layers.0.mlp.up_proj")

    with pytest.raises(UserError, match="has no module model.layers.7"):
        lowbit.load_quantized(_edit(saved, tmp_path, change, resign=True))


def test_the_saved_description_passes_its_own_check(saved):
    config = read_config(saved)
    assert config[CHECKSUM_KEY] == description_checksum(config)


# ---------------------------------------------------------------- 4, 5. one clear line, early


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--windows", "0"], "--windows must be a positive number"),
        (["--windows", "-3"], "--windows must be a positive number"),
        (["--seq-len", "1"], "--seq-len must be at least 2"),
        (["--seq-len", "100000"], "longer than the model's context (256 tokens)"),
        (["--scheme", "W4g-64"], "may only separate the parts"),
        (["--calib-samples", "0"], "--calib-samples must be at least 1"),
    ],
)
def test_bad_values_are_one_line_before_the_model_loads(tiny_model_dir, sample_text_file, capsys, monkeypatch, extra, needle):
    import lowbit.jobs
    import lowbit.models

    def no_weights(*args, **kwargs):
        raise AssertionError("the model's weights were loaded before the mistake was found")

    monkeypatch.setattr(lowbit.models, "load_model", no_weights)
    monkeypatch.setattr(lowbit.jobs, "load_model", no_weights)
    code, _, err = run(quantize_args(tiny_model_dir, sample_text_file, *extra), capsys)
    assert code == 2 and needle in err and err.count("\n") == 1, err


def test_a_truncated_gguf_file_is_one_line(tmp_path, capsys, monkeypatch):
    from lowbit.models import packaged_gguf

    try:
        real = packaged_gguf("smollm2-135m")
    except UserError:
        pytest.skip("the default model package is not installed")
    cut = tmp_path / "cut.gguf"
    with open(real, "rb") as f:
        cut.write_bytes(f.read(2_000_000))
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    code, _, err = run(["-q", "info", "--model", str(cut)], capsys)
    assert code == 2 and "not a readable GGUF file" in err and err.count("\n") == 1, err
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + os.urandom(4000))
    code, _, err = run(["-q", "info", "--model", str(garbage)], capsys)
    assert code == 2 and err.count("\n") == 1, err


def test_an_unwritable_output_or_cache_is_one_line_before_any_work(tiny_model_dir, sample_text_file, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = run(quantize_args(tiny_model_dir, sample_text_file, "--out", str(blocker / "run")), capsys)
    assert code == 2 and "not a writable folder" in err and err.count("\n") == 1, err
    monkeypatch.setenv("LOWBIT_CACHE", str(blocker / "cache"))
    from lowbit.models import packaged_gguf

    try:
        packaged_gguf("smollm2-135m")
    except UserError:
        pytest.skip("the default model package is not installed")
    code, _, err = run(["-q", "info"], capsys)
    assert code == 2 and "cannot write" in err and err.count("\n") == 1, err


# ---------------------------------------------------------------- 6, 7. leftovers, logs, modes


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_what_a_killed_run_left_is_swept_and_live_runs_are_not(tmp_path):
    from lowbit.files import _host

    out = tmp_path / "run"
    dead = tmp_path / f".run.lowbit-{_host()}-{_dead_pid()}-staging-abc"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"0" * 1000)
    dead_file = tmp_path / f".run.lowbit-{_host()}-{_dead_pid()}-xyz"
    dead_file.write_text("half")
    alive = tmp_path / f".run.lowbit-{_host()}-{os.getpid()}-staging-def"
    alive.mkdir()
    other = tmp_path / ".something-else"
    other.mkdir()
    removed = sweep_stale(out)
    assert sorted(removed) == sorted([dead, dead_file])
    assert not dead.exists() and alive.exists() and other.exists()


def test_outputs_have_the_usual_modes(tmp_path):
    old = os.umask(0o022)
    try:
        out = write_dir_atomically(tmp_path / "out", lambda tmp: (tmp / "f.txt").write_text("x"))
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o755 and ((out / "f.txt").stat().st_mode & 0o777) == 0o644


def test_progress_in_a_log_is_plain_lines(tiny_model_dir, sample_text_file, tmp_path):
    proc = subprocess.run(
        [*LOWBIT, "quantize", "--model", str(tiny_model_dir), "--data", str(sample_text_file), "--seq-len", "32", "--windows", "3"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "perplexity" in proc.stderr


# ---------------------------------------------------------------- fault injection


def _killed_at(args: list[str], delay: float) -> int:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    return proc.wait()


@pytest.mark.slow
def test_kill_9_anywhere_leaves_no_partial_output_and_the_rerun_is_exact(tiny_model_dir, sample_text_file, tmp_path):
    """A run killed at several points (loading, evaluating, saving) leaves either nothing or a
    whole output; the rerun sweeps its leftovers and reports exactly what an uninterrupted run does."""
    reference = tmp_path / "reference"
    base = [*LOWBIT, *quantize_args(tiny_model_dir, sample_text_file, "--scheme", "W4A8KV4", "--seed", "1")]
    start = time.time()
    assert subprocess.run([*base, "--out", str(reference)], capture_output=True, timeout=600).returncode == 0
    duration = time.time() - start
    expected = json.loads((reference / "report.json").read_text())
    for i, fraction in enumerate((0.3, 0.6, 0.8, 0.9, 0.97)):
        out = tmp_path / f"run{i}"
        code = _killed_at([*base, "--out", str(out)], duration * fraction)
        if out.exists():  # renamed into place before the kill (the process may still have died after): whole
            assert code in (0, -signal.SIGKILL) and (out / "report.json").is_file() and (out / "model" / CONFIG_FILE).is_file()
            read_config(out / "model")
            continue
        rerun = subprocess.run([*base, "--out", str(out)], capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr
        got = json.loads((out / "report.json").read_text())
        assert got["quantized"]["ppl"] == expected["quantized"]["ppl"] and got["fp"]["ppl"] == expected["fp"]["ppl"]
        read_config(out / "model")  # every checksum holds
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers


@pytest.mark.slow
def test_kill_9_during_generation_and_qat_checkpointing_resumes_exactly(tiny_model_dir, sample_text_file, tmp_path):
    """`generate-data` and `qat --checkpoint-every 1` killed at several points: the reruns finish
    with the same shards and the same trained model (losses and perplexity) as uninterrupted runs."""
    gen = ["-q", "generate-data", "--model", str(tiny_model_dir), "--samples", "12", "--max-length", "16", "--shard-size", "3",
           "--batch-size", "3"]  # fmt: skip
    qat = ["-q", "qat", "--model", str(tiny_model_dir), "--scheme", "W4A8KV4", "--steps", "6", "--batch-size", "2", "--lr", "1e-3",
           "--checkpoint-every", "1", "--eval-data", str(sample_text_file), "--windows", "2", "--seq-len", "32"]  # fmt: skip
    ref_data, ref_run = tmp_path / "ref-data", tmp_path / "ref-run"
    start = time.time()
    assert subprocess.run([*LOWBIT, *gen, "--out", str(ref_data)], capture_output=True, timeout=600).returncode == 0
    gen_seconds = time.time() - start
    start = time.time()
    assert subprocess.run([*LOWBIT, *qat, "--data", str(ref_data), "--out", str(ref_run)], capture_output=True, timeout=600).returncode == 0
    qat_seconds = time.time() - start
    expected = json.loads((ref_run / "report.json").read_text())
    for i, fraction in enumerate((0.5, 0.75, 0.9)):
        data, out = tmp_path / f"data{i}", tmp_path / f"run{i}"
        _killed_at([*LOWBIT, *gen, "--out", str(data)], gen_seconds * fraction)
        rerun = subprocess.run([*LOWBIT, *gen, "--out", str(data)], capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr
        for shard in sorted(ref_data.glob("shard-*")):
            assert (data / shard.name).read_bytes() == shard.read_bytes()
        _killed_at([*LOWBIT, *qat, "--data", str(data), "--out", str(out)], qat_seconds * fraction)
        if not out.exists():
            rerun = subprocess.run([*LOWBIT, *qat, "--data", str(data), "--out", str(out)], capture_output=True, text=True, timeout=600)
            assert rerun.returncode == 0, rerun.stderr
        got = json.loads((out / "report.json").read_text())
        assert got["qat"]["loss_history"] == expected["qat"]["loss_history"]
        assert got["quantized"]["ppl"] == expected["quantized"]["ppl"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_output_that_would_replace_an_input_is_refused(tiny_model_dir, sample_text_file, tmp_path, capsys, monkeypatch):
    before = {p.name: p.read_bytes() for p in tiny_model_dir.iterdir()}
    for out in (tiny_model_dir, tiny_model_dir.parent):  # the model folder itself, or a folder holding it
        code, _, err = run(quantize_args(tiny_model_dir, sample_text_file, "--out", str(out), "--overwrite"), capsys)
        assert code == 2 and "would replace the input" in err and err.count("\n") == 1, err
    assert {p.name: p.read_bytes() for p in tiny_model_dir.iterdir()} == before
    monkeypatch.chdir(sample_text_file.parent)  # the evaluation text spelled another way as calibration
    code, _, err = run(quantize_args(tiny_model_dir, sample_text_file, "--calib", f"./{sample_text_file.name}"), capsys)
    assert code == 2 and "never calibrate on the evaluation text" in err, err
