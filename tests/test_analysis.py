"""lowbit analyze: "Turning LLM Activations Quantization-Friendly"'s metrics on constructed inputs with known answers, outlier detection,
eq. 8/9, the streaming capture on every family, and the command."""

import json
import math

import pytest
import torch
from conftest import FAMILIES, tiny_model

from lowbit.analysis.capture import input_sites, stream_inputs
from lowbit.analysis.job import AnalysisConfig, analyze_model
from lowbit.analysis.metrics import (
    TRANSFORMS,
    ActivationStats,
    Moments,
    channel_magnitudes,
    difficulty,
    layer_error,
    pearson,
    spearman,
    transform_pair,
)
from lowbit.analysis.outliers import InputScan, OutlierConfig, massive_entries
from lowbit.analysis.theory import eq8_rotation_max, eq9_smoothrot_max, theory_check
from lowbit.arch import get_arch
from lowbit.cli import main
from lowbit.hadamard import hadamard_transform
from lowbit.scheme import QuantArgs
from lowbit.transforms.smooth import smooth_scales

INT4_W = QuantArgs(bits=4, granularity="channel")
INT4_A = QuantArgs(bits=4, granularity="token")


def test_layer_error_equals_hand_computed_value():
    # INT4 symmetric, step = max/7 per row. X rows: [1, -7] (step 1, exact) and [2, 0.5]
    # (step 2/7: 0.5 -> 1.75 -> 2 -> 4/7). W rows (nn.Linear [out, in]): [0.7, 0.2] (step 0.1,
    # exact) and [1.4, -0.25] (step 0.2: -1.25 -> -1 -> -0.2).
    x = torch.tensor([[1.0, -7.0], [2.0, 0.5]], dtype=torch.float64)
    w = torch.tensor([[0.7, 0.2], [1.4, -0.25]], dtype=torch.float64)
    # X W^T = [[-0.7, 3.15], [1.5, 2.675]]; Q(X) Q(W)^T = [[-0.7, 2.8], [1.4 + 0.8/7, 2.8 - 0.8/7]]
    expected = 0.35**2 + (0.1 / 7) ** 2 + (0.075 / 7) ** 2
    assert layer_error(x, w, INT4_W, INT4_A) == pytest.approx(expected, rel=1e-9)
    # unquantized activations: only the weight error of row 2 remains, (-7 * 0.05)^2 + (0.5 * 0.05)^2
    assert layer_error(x, w, INT4_W, None) == pytest.approx(0.35**2 + 0.025**2, rel=1e-9)


def test_difficulty_is_std_of_channel_norms():
    x = torch.tensor([[1.0, -7.0], [2.0, 0.5]])
    mags = channel_magnitudes(x)
    assert mags.tolist() == pytest.approx([math.sqrt(5), math.sqrt(49.25)])
    assert difficulty(mags) == pytest.approx(abs(math.sqrt(5) - math.sqrt(49.25)) / 2)  # population std of 2 values
    assert difficulty(channel_magnitudes(torch.ones(10, 4))) == 0.0


def test_streamed_statistics_equal_the_whole_tensor():
    torch.manual_seed(0)
    x = torch.randn(300, 16) * torch.linspace(0.1, 5, 16)
    x[7, 3] = 80.0
    stats, scan = ActivationStats(), InputScan(OutlierConfig())
    for chunk in x.split(64):
        stats.update(chunk)
        scan.update(chunk)
    whole = x.double().flatten()
    central = whole - whole.mean()
    kurt = float((central**4).mean() / (central**2).mean() ** 2)
    s = stats.summary()
    assert s["difficulty"] == pytest.approx(difficulty(channel_magnitudes(x)), rel=1e-6)
    assert s["kurtosis"] == pytest.approx(kurt, rel=1e-4)
    assert s["max_abs"] == pytest.approx(80.0)
    assert torch.equal(scan.channel_absmax, x.abs().amax(0))
    assert scan.typical_token_max == pytest.approx(float(x.abs().amax(1).median()))
    m = Moments()
    m.update(torch.tensor([1.0, -1.0, 1.0, -1.0]))
    assert m.kurtosis == pytest.approx(1.0)  # a two-point distribution


def test_planted_systematic_channel_and_massive_token_are_found():
    torch.manual_seed(1)
    x = torch.randn(256, 64) * 0.5
    x[:, 5] = 30.0 + torch.rand(256)  # systematic: large in every token
    x[100, 10], x[100, 40] = 5000.0, -3000.0  # massive: one token, two channels
    x[200, 33] = 40.0  # large but neither systematic nor massive
    scan = InputScan(OutlierConfig(massive_ratio=50, systematic_ratio=10, systematic_fraction=0.5))
    for chunk in x.split(50):
        scan.update(chunk)
    assert [c["channel"] for c in scan.systematic_channels()] == [5]
    assert scan.systematic_channels()[0]["token_share"] == 1.0
    assert scan.massive_tokens() == [100]
    channels, values = massive_entries(x[100], scan.massive_threshold)
    assert channels == [10, 40] and values == [5000.0, -3000.0]


def test_eq8_matches_a_rotated_constructed_token():
    for d in (64, 576):  # Sylvester, and 16 x 36 (Paley)
        token = torch.zeros(d, dtype=torch.float64)
        token[[3, 17, 50]] = torch.tensor([900.0, -400.0, 250.0], dtype=torch.float64)
        measured = float(hadamard_transform(token[None])[0].abs().max())
        assert measured == pytest.approx(eq8_rotation_max([900, -400, 250], d), rel=1e-12)
        assert measured == pytest.approx(1550 / math.sqrt(d), rel=1e-12)
    # with noise eps ~ N(0, sigma^2) elsewhere the max moves by a few sigma at most
    torch.manual_seed(2)
    token = torch.randn(576, dtype=torch.float64) * 0.1
    token[[3, 17]] = torch.tensor([900.0, -400.0], dtype=torch.float64)
    check = theory_check(token, [3, 17], torch.ones(576), torch.ones(576))
    assert check["eps_sigma"] == pytest.approx(0.1, rel=0.15)
    assert abs(check["rotate_measured"] - check["rotate_eq8_outlier_part"]) < 5 * check["eps_sigma"]


def test_eq9_matches_a_smoothed_and_rotated_constructed_token():
    torch.manual_seed(3)
    d = 64
    x = torch.zeros(8, d, dtype=torch.float64)
    x[1:] = torch.randn(7, d, dtype=torch.float64) * 0.1
    x[0, [4, 9]] = torch.tensor([800.0, -300.0], dtype=torch.float64)  # token 0 holds both channel maxima
    w = torch.randn(32, d, dtype=torch.float64) * 0.05
    w_absmax = w.abs().amax(0)
    scales = smooth_scales(x.abs().amax(0), w_absmax, 0.5)
    check = theory_check(x[0], [4, 9], scales, w_absmax)
    expected = eq9_smoothrot_max([800.0, -300.0], [float(w_absmax[4]), float(w_absmax[9])], d)
    assert check["smoothrot_eq9"] == pytest.approx(expected)
    assert check["smoothrot_measured"] == pytest.approx(expected, rel=1e-9)  # other entries are 0: exact
    assert check["smoothrot_measured"] < check["rotate_measured"]  # smoothing first lowers the max


def test_transforms_preserve_the_layer_output():
    torch.manual_seed(4)
    x, w = torch.randn(20, 96, dtype=torch.float64), torch.randn(24, 96, dtype=torch.float64)
    scales = smooth_scales(x.abs().amax(0), w.abs().amax(0), 0.5)
    for kind in TRANSFORMS:
        xt, (wt,) = transform_pair(kind, x, [w], scales)
        torch.testing.assert_close(xt @ wt.T, x @ w.T)


def test_pearson_and_spearman():
    assert pearson([1, 2, 3, 4], [2, 4, 6, 8.5]) == pytest.approx(float(torch.corrcoef(torch.tensor([[1, 2, 3, 4], [2, 4, 6, 8.5]]))[0, 1]))
    assert math.isnan(pearson([1, 2], [1, 2]))
    assert spearman([1, 2, 3, 4], [1, 10, 100, 1e6]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def _batches(n=4, seq=32, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, seq), generator=g) for _ in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_analysis_runs_on_every_family_and_matches_direct_capture(family):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _batches()
    config = AnalysisConfig(tokens=128, seq_len=32, batch_size=2)
    result, _ = analyze_model(model, None, batches, config, progress=False)
    spec = get_arch(model)
    assert len(result["layers"]) == 2 * len(spec.input_groups)
    assert {e["role"] for e in result["layers"]} == {"qkv", "o", "gate_up", "down"}
    # the streamed error of one input equals the error on the whole captured input
    site = input_sites(model, spec)[-1]
    captured = []
    stream_inputs(model, spec, [torch.cat(batches)], lambda s, x, _: captured.append(x) if s == site else None, progress=False)
    x = torch.cat(captured)
    (linear,) = site.linears(model, spec).values()
    entry = next(e for e in result["layers"] if e["site"] == site.name)
    assert entry["error"]["none"] == pytest.approx(layer_error(x, linear.weight, INT4_W, INT4_A), rel=1e-5)
    assert entry["activation"]["none"]["difficulty"] == pytest.approx(difficulty(channel_magnitudes(x)), rel=1e-5)
    assert all(v > 0 for e in result["layers"] for v in e["error"].values())
    # the model is only read: same weights, no hooks left
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_planted_systematic_channel_in_a_model_is_located():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[7] = 60.0  # gate/up input of layer 1, channel 7
    result, _ = analyze_model(model, None, _batches(), AnalysisConfig(tokens=128, seq_len=32), progress=False)
    found = {e["site"]: [c["channel"] for c in e["systematic_channels"]] for e in result["layers"]}
    assert 7 in found["gate_up.1"]
    assert 7 not in found["gate_up.0"] and 7 not in found["qkv.1"]


def run(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.mark.parametrize("scheme", [None, "Wnvfp4Anvfp4"])
def test_analyze_command_writes_report_and_plots(tiny_model_dir, sample_text_file, tmp_path, capsys, scheme):
    pytest.importorskip("matplotlib")
    out = tmp_path / "analysis"
    args = [
        "-q",
        "analyze",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(sample_text_file),
        "--tokens",
        "64",
        "--seq-len",
        "32",
        "--massive-ratio",
        "5",
        "--out",
        str(out),
    ] + (["--scheme", scheme] if scheme else [])
    code, stdout, _ = run(args, capsys)
    assert code == 0
    result = json.loads((out / "analysis.json").read_text())
    name = scheme or "W4A4"
    assert result["scheme"] == name and result["sample"]["tokens"] == 64
    contract = json.loads((out / "report.json").read_text())
    assert contract["scheme"] == name and contract["seconds"] > 0 and contract["analysis"] == "analysis.json"
    report = (out / "report.md").read_text()
    assert "## Findings" in report and "## Massive outliers" in report and result["recommendation"][0] in stdout
    for name in ["layers_qkv.png", "layers_down.png", "layers_modules.png", "error_vs_difficulty.png"] + [
        f"surface_{s}.png" for s in result["plot_sites"]
    ]:
        assert (out / name).stat().st_size > 1000 and name in result["plots"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["analysis", "sample.txt", "tiny-llama"]  # no temp leftovers
    code, _, err = run(args, capsys)  # an existing folder is refused
    assert code == 2 and "exists; pass --overwrite" in err


def test_analyze_keeps_raw_inputs_of_named_layers(tiny_model_dir, sample_text_file, tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "analysis"
    args = [
        "-q",
        "analyze",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(sample_text_file),
        "--tokens",
        "64",
        "--seq-len",
        "32",
        "--keep-raw",
        "1",
        "--no-plots",
        "--out",
        str(out),
    ]
    code, _, _ = run(args, capsys)
    assert code == 0 and not list(out.glob("*.png"))
    assert sorted(p.name for p in (out / "raw").iterdir()) == [f"{r}.1.safetensors" for r in ("down", "gate_up", "o", "qkv")]
    raw = load_file(str(out / "raw" / "down.1.safetensors"))["input"]
    assert raw.shape == (64, 128)
    assert "surface_down.1.png" not in json.loads((out / "analysis.json").read_text())["plots"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tokens", "100"], "must be a positive multiple of --seq-len"),
        (["--scheme", "W4A4s"], "drop the 's'"),
        (["--scheme", "W16A16"], "quantizes neither"),
        (["--transforms", "none,twist"], "unknown transform"),
        (["--keep-raw", "9"], "out of range"),
        (["--keep-raw", "a"], "comma-separated layer indices"),
        (["--massive-ratio", "0.5"], "massive-outlier ratio must be above 1"),
        (["--alpha", "2"], "alpha must be in [0, 1]"),
    ],
)
def test_analyze_bad_input_exits_2_with_one_line(tiny_model_dir, sample_text_file, tmp_path, capsys, extra, message):
    out = tmp_path / "analysis"
    args = [
        "-q",
        "analyze",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(sample_text_file),
        "--tokens",
        "64",
        "--seq-len",
        "32",
        "--out",
        str(out),
        *extra,
    ]
    code, _, err = run(args, capsys)
    assert code == 2 and message in err and err.startswith("lowbit: error:") and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.slow
def test_default_model_has_massive_outliers_at_down_proj_and_eq8_holds(default_model):
    model, tokenizer = default_model
    from lowbit.data import calibration_batches

    batches = calibration_batches(tokenizer, None, 1, 128, 0)
    result, _ = analyze_model(model, tokenizer, batches, AnalysisConfig(tokens=128, seq_len=128), progress=False)
    massive = result["massive_outliers"]
    assert massive and all(
        r["role"] == "down" for r in massive
    )  # as in "Turning LLM Activations Quantization-Friendly": massive outliers live in down_proj
    big = [
        r for r in massive if r["max_abs"] > 1000
    ]  # down_proj 11 and 28 (as in "Turning LLM Activations Quantization-Friendly": > 1000 in LLaMA2-7B)
    assert {r["site"] for r in big} == {"down.11", "down.28"}
    for r in big:  # where the outliers dominate the token, eq. 8 is within 10% of the measured max
        assert r["rotate_measured"] == pytest.approx(r["rotate_eq8"], rel=0.1)
    for r in massive:  # elsewhere the rest of the token (eps) adds a few sigma at most
        assert abs(r["rotate_measured"] - r["rotate_eq8_outlier_part"]) < 6 * r["eps_sigma"]
    c = result["correlation_error_vs_difficulty_sq"]["none"]
    assert c["points"] == 120 and c["points_kept"] == 120 - len(result["set_aside"])


def test_analyze_on_generated_text(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "analysis"
    args = [
        "-q",
        "analyze",
        "--model",
        str(tiny_model_dir),
        "--data",
        "generated",
        "--tokens",
        "32",
        "--seq-len",
        "16",
        "--no-plots",
        "--out",
        str(out),
    ]
    code, _, _ = run(args, capsys)
    assert code == 0
    result = json.loads((out / "analysis.json").read_text())
    assert result["data"] == "generated" and result["sample"] == {"sequences": 2, "seq_len": 16, "tokens": 32}


def test_batches_of_different_shapes_are_refused():
    from lowbit.errors import UserError

    with pytest.raises(UserError, match="one shape"):
        analyze_model(
            tiny_model("llama"),
            None,
            [torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 9, dtype=torch.long)],
            AnalysisConfig(tokens=16, seq_len=8),
            progress=False,
        )
