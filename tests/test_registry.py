"""Algorithms are registered data: one registered from outside the package (a few lines here) runs
through the Python API, a recipe file and the CLI, with its knobs type-checked like the built-ins'."""

import json
from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_model

import lowbit
from lowbit import AlgorithmResult, UserError, register_algorithm
from lowbit.algorithms.registry import ALGORITHMS
from lowbit.cli import main
from lowbit.quant import fake_quantize, quantize_weight
from lowbit.quant.fake import as_rows, minmax_qparams
from lowbit.runtime import QuantLinear
from lowbit.scheme import parse_scheme

# ---- the outside algorithms: a clipped RTN (no calibration) and one that needs calibration


@dataclass(frozen=True)
class ClipConfig:
    ratio: float = 0.9


@dataclass(frozen=True)
class CountingConfig:
    ratio: float = 0.8
    min_rows: int = 1


class RowCounter:
    def __init__(self, columns, config, device):
        self.columns, self.rows = columns, 0

    def add_batch(self, x):
        assert x.shape[-1] == self.columns
        self.rows += x.reshape(-1, self.columns).shape[0]


def clipped(weight, args, ratio):
    return quantize_weight(weight, args, minmax_qparams(as_rows(weight, args), args, ratio))


@pytest.fixture
def outside_algorithms():
    @register_algorithm("test-clip", ClipConfig)
    def clip_rtn(weight, stats, args, config, context):
        return AlgorithmResult(clipped(weight, args, config.ratio))

    @register_algorithm("test-counting", CountingConfig, statistics=RowCounter)
    def counting(weight, stats, args, config, context):
        assert stats.rows >= config.min_rows  # it saw the calibration inputs of its layer
        return AlgorithmResult(clipped(weight, args, config.ratio), errors={"test-counting": 0.0, "rows": stats.rows})

    yield
    ALGORITHMS.pop("test-clip")
    ALGORITHMS.pop("test-counting")


def calibration():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 512, (1, 16), generator=g) for _ in range(2)]


def assert_clipped(model, q, percent):
    """Every decoder linear of `q` holds the RTN weight of `model` clipped at `percent`."""
    args = parse_scheme(f"W4c{percent}").weights
    for name, module in q.named_modules():
        if isinstance(module, QuantLinear):
            original = model.get_submodule(name).weight
            assert torch.equal(module.dense_weight(), fake_quantize(original, args)), name


def test_outside_algorithm_through_the_python_api(outside_algorithms):
    model = tiny_model("qwen3")
    assert {"test-clip", "test-counting"} <= set(lowbit.algorithm_names())
    assert_clipped(model, lowbit.quantize(model, "W4A16", algorithm=ClipConfig(ratio=0.8), progress=False), 80)
    assert_clipped(model, lowbit.quantize(model, "W4A16", algorithm="test-clip", progress=False), 90)  # default config
    q = lowbit.quantize(model, "W4A16", algorithm=CountingConfig(ratio=0.7), calibration=calibration(), progress=False)
    assert_clipped(model, q, 70)
    state = lowbit.quantization_state(q)
    assert state.algorithm == "test-counting" and state.algorithm_config == {"ratio": 0.7, "min_rows": 1}
    assert all(entry["qkv"]["rows"] == 32 for entry in state.layer_errors)  # 2 samples x 16 tokens, each layer
    with pytest.raises(UserError, match="test-counting needs calibration data"):
        lowbit.quantize(model, "W4A16", algorithm="test-counting", progress=False)


def test_outside_algorithm_through_a_recipe_file(outside_algorithms, tmp_path):
    model = tiny_model("llama")
    path = tmp_path / "recipe.yaml"
    path.write_text("scheme: W4A16\nalgorithm: test-clip\nratio: 0.75\n")
    recipe = lowbit.load_recipe(str(path))
    assert recipe.algorithm_config == ClipConfig(ratio=0.75)
    assert_clipped(model, lowbit.quantize(model, recipe, progress=False), 75)
    for text, needle in (("ratio: high", "ratio must be a number"), ("damp: 0.1", "unknown keys damp for algorithm test-clip")):
        path.write_text(f"scheme: W4A16\nalgorithm: test-clip\n{text}\n")
        with pytest.raises(UserError, match=needle):
            lowbit.load_recipe(str(path))


def test_outside_algorithm_through_the_cli(outside_algorithms, tiny_model_dir, sample_text_file, tmp_path, capsys):
    out = tmp_path / "run"
    calib = tmp_path / "calib.txt"
    calib.write_text(sample_text_file.read_text()[::-1])  # another text than the evaluation's
    args = [
        "-q",
        "quantize",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(sample_text_file),
        "--calib",
        str(calib),
        "--seq-len",
        "32",
        "--windows",
        "2",
        "--calib-samples",
        "2",
        "--calib-seq-len",
        "16",
        "--scheme",
        "W4A16",
        "--algorithm",
        "test-counting",
        "--set",
        "ratio=0.6",
        "--set",
        "min_rows=8",
        "--out",
        str(out),
    ]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["algorithm"] == "test-counting" and report["algorithm_args"] == {"ratio": 0.6, "min_rows": 8}
    assert report["calibration"]["samples"] == 2
    loaded, _ = lowbit.load_quantized(out)
    assert lowbit.quantization_state(loaded).algorithm == "test-counting"
    with pytest.raises(SystemExit) as exc:
        main([*args[:-2], "--set", "min_rows=many", "--out", str(tmp_path / "other")])
    assert exc.value.code == 2 and "min_rows must be an integer" in capsys.readouterr().err


def test_registration_mistakes_are_refused():
    with pytest.raises(ValueError, match="letters, digits"):
        register_algorithm("no spaces", ClipConfig)
    with pytest.raises(ValueError, match="already the config of algorithm 'gptq'"):
        register_algorithm("gptq2", lowbit.GPTQConfig)(lambda *a: None)
    with pytest.raises(UserError, match="no algorithm is registered for config type ClipConfig"):
        lowbit.quantize(tiny_model("llama"), "W4A16", algorithm=ClipConfig(), progress=False)
