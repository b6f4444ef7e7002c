"""Data-parallel calibration on torch.distributed: 2 processes (gloo, CPU) give the 1-process model,
dense and mixture-of-experts.

Tolerance. The split is batch-aligned (each rank runs batches one process runs, on the same
tokens), and what the ranks combine is combined exactly (channel maxima and static ranges by
MIN/MAX, AWQ's and SmoothQuant's sample rows gathered) or as float64 sums of the same fp32 batch
products (GPTQ's Hessian, AWQ's channel means), whose float64 rounding the fp32 results do not
see. So the 2-process model is expected to be the same to the bit: measured max |delta| 0.0 for
dequantized weights, static ranges and logits. The tolerance, 1e-6, only absorbs summation order
below the models' values (~1); a code moved to another grid point (a step ~1e-2 here) fails it.
The per-group errors in the report of a group whose linears GPTQ quantized on different ranks are
combined from the parts in another order: relative 1e-5 (measured ~1e-7).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import quantize_args, run_cli, tiny_model

import lowbit
from lowbit import UserError
from lowbit.algorithms.awq import AWQ
from lowbit.algorithms.gptq import GPTQ, GPTQConfig
from lowbit.arch import get_arch
from lowbit.distributed import assign_by_size, share
from lowbit.pipeline import PipelineConfig
from lowbit.runtime import QuantLinear
from lowbit.runtime.quantizer import TensorQuantizer
from lowbit.transforms.apply import TransformConfig, collect_input_stats

ATOL = 1e-6  # weights, ranges and logits (measured: 0.0); see the module docstring
ERROR_RTOL = 1e-5  # report errors of groups quantized in parts (measured ~1e-7)

CASES = {
    "gptq": dict(scheme="W4A16", algorithm="gptq"),
    "gptq-per-tensor": dict(scheme="W4tA16", algorithm="gptq"),  # one scale for q/k/v: the group stays whole
    # GPTAQ: each rank runs its share of both streams; the Hessian and dX X^T sums are reduced
    "gptaq": dict(scheme="W4A4KV4", algorithm=GPTQConfig(asymmetric=True), transform=TransformConfig(kind="rotate")),
    "awq": dict(scheme="W4A16", algorithm="awq"),
    "awq-static": dict(scheme="W8A8sKV8s", algorithm="awq"),  # static input and KV ranges in the pipeline
    "smoothquant": dict(scheme="W8A8", algorithm="rtn", transform=TransformConfig(kind="smooth", alpha=None)),
    "static-rtn": dict(scheme="W8A8sKV8s", algorithm="rtn"),  # static ranges by calibrate_static
    # mixtures of experts: each expert on its routed tokens, experts shared out over the ranks,
    # some below the RTN fallback threshold (64 tokens) and some above
    "moe-gptq": dict(scheme="W4A16", algorithm="gptq", family="qwen2_moe"),  # with a shared expert
    "moe-gptq-static": dict(scheme="W8A8sKV8s", algorithm="gptq", family="mixtral"),
    "moe-smoothquant": dict(scheme="W8A8", algorithm="rtn", transform=TransformConfig(kind="smooth", alpha=None), family="mixtral"),
}


def calibration(n: int = 10, length: int = 16) -> list[torch.Tensor]:
    """10 samples: batches of 4, 4 and 2; rank 0 takes the first batch, rank 1 the other two."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 512, (1, length), generator=g) for _ in range(n)]


def probe() -> torch.Tensor:
    return torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(9))


@torch.no_grad()
def outcome(model) -> dict:
    """What must agree: every dequantized weight, every static range, the logits, the errors."""
    weights = {n: m.quantized_weight.dequantize() for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.is_quantized}
    ranges = {
        n: torch.stack([m.observed_min, m.observed_max]) for n, m in model.named_modules() if isinstance(m, TensorQuantizer) and not m.args.dynamic
    }
    state = lowbit.quantization_state(model)
    return {"weights": weights, "ranges": ranges, "logits": model(probe()).logits, "errors": state.layer_errors, "transform": state.transform}


def quantize_case(name: str) -> dict:
    from test_moe import tiny_moe

    case = dict(CASES[name])
    family = case.pop("family", "llama")
    model = tiny_model(family) if family == "llama" else tiny_moe(family)
    # batches of 4 in both (the default is larger for one process in one pass): the split stays batch-aligned
    pipeline = PipelineConfig(batch_size=4)
    return outcome(lowbit.quantize(model, case.pop("scheme"), calibration=calibration(), pipeline=pipeline, progress=False, **case))


@torch.no_grad()
def statistics_parts() -> dict:
    """The statistics objects and the transform's statistics on this rank's share, combined."""
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(2, 30, 8, generator=g) for _ in range(6)]  # 60 rows each
    mine = batches[share(len(batches), 1)]
    before = sum(b.shape[0] * b.shape[1] for b in batches[: share(len(batches), 1).start])
    awq, gptq, gptaq = AWQ(8, sample_rows=50, seed=1), GPTQ(8), GPTQ(8, asymmetric=True)
    awq.skip(before)
    for b in mine:
        awq.add_batch(b)
        gptq.add_batch(b)
        gptaq.add_batch(b, b.flip(0))  # some other "full-precision" inputs
    awq.reduce()
    gptq.reduce()
    gptaq.reduce()
    model = tiny_model("llama")
    stats = collect_input_stats(model, get_arch(model), calibration(), keep_rows=6, progress=False)
    return {
        "awq_rows": awq.sample().clone(),
        "awq_mean": awq.abs_sum / awq.count,
        "hessian": gptq.hessian,
        "gptaq": (gptaq.hessian, gptaq.cross()),
        "transform": stats,
    }


def _worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {name: quantize_case(name) for name in CASES}
    results["statistics"] = statistics_parts()
    try:  # one sample for two processes
        lowbit.quantize(tiny_model("llama"), "W4A16", algorithm="gptq", calibration=calibration(1), progress=False)
    except UserError as exc:
        results["error"] = str(exc)
    try:  # AWQ's per-row sample on routed tokens cannot be split
        from test_moe import tiny_moe

        lowbit.quantize(tiny_moe("mixtral"), "W4A16", algorithm="awq", calibration=calibration(), progress=False)
    except UserError as exc:
        results["moe-awq"] = str(exc)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> list[dict]:
    """Every case quantized by 2 processes through the Python API (spawned, gloo): each rank's results."""
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("dp")
    mp.spawn(_worker, args=(2, f"file://{tmp}/rendezvous", str(tmp)), nprocs=2, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


def max_delta(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(((a[k].float() - b[k].float()).abs().max().item() for k in a), default=0.0)


def assert_errors_close(a, b, where: str = "errors") -> None:
    """Report errors (nested dicts and lists: layers, groups, experts): numbers within ERROR_RTOL,
    everything else (token counts, fallback lists, flags) equal."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_errors_close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_errors_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=ERROR_RTOL), where
    else:
        assert a == b, where


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_give_the_one_process_model(two_processes, name):
    rank0, rank1 = (r[name] for r in two_processes)
    # every rank holds the same quantized model: the owners sent their results to all
    assert max_delta(rank0["weights"], rank1["weights"]) == 0.0 and max_delta(rank0["ranges"], rank1["ranges"]) == 0.0
    assert torch.equal(rank0["logits"], rank1["logits"])
    # the ranks run on 1 thread; fp32 matrix products split over more threads round differently
    # (GPTAQ's target W + alpha W dX X^T H^-1 moved by 6.6e-7 at 2 threads), which is not what is tested
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = quantize_case(name)
    finally:
        torch.set_num_threads(threads)
    measured = {
        "weights": max_delta(one["weights"], rank0["weights"]),
        "ranges": max_delta(one["ranges"], rank0["ranges"]),
        "logits": (one["logits"] - rank0["logits"]).abs().max().item(),
    }
    print(f"{name}: max |delta| 1 vs 2 processes: {measured}")
    assert all(v <= ATOL for v in measured.values()), measured
    assert bool(one["ranges"]) == ("static" in name)  # the static cases have ranges to compare
    assert_errors_close(one["errors"], rank0["errors"])
    assert one["transform"] == rank0["transform"]  # SmoothQuant: the same alpha per layer and group


def test_statistics_reduce_to_the_one_process_statistics(two_processes):
    """AWQ keeps the rows one process keeps (its bounded sample is full and evicting here), in the
    same order; GPTQ's Hessian and the transform's maxima and sampled rows are those of one process."""
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(2, 30, 8, generator=g) for _ in range(6)]
    awq, gptq, gptaq = AWQ(8, sample_rows=50, seed=1), GPTQ(8), GPTQ(8, asymmetric=True)
    for b in batches:
        awq.add_batch(b)
        gptq.add_batch(b)
        gptaq.add_batch(b, b.flip(0))
    gptaq_sums = (gptaq.hessian, gptaq.cross())
    model = tiny_model("llama")
    stats = collect_input_stats(model, get_arch(model), calibration(), keep_rows=6, progress=False)
    for r in two_processes:
        got = r["statistics"]
        assert torch.equal(got["awq_rows"], awq.sample())
        assert torch.allclose(got["awq_mean"], awq.abs_sum / awq.count, rtol=1e-15)
        assert torch.equal(got["hessian"], gptq.hessian)
        assert torch.equal(got["gptaq"][0], gptaq_sums[0]) and torch.equal(got["gptaq"][1], gptaq_sums[1])
        assert got["transform"].keys() == stats.keys()
        for key, entry in stats.items():
            assert torch.equal(got["transform"][key]["absmax"], entry["absmax"])
            assert torch.equal(got["transform"][key]["rows"], entry["rows"])


def test_more_processes_than_samples_is_refused(two_processes, tiny_model_dir, sample_text_file, capsys, monkeypatch):
    for r in two_processes:  # the Python API, on both ranks
        assert "2 processes but 1 calibration sample(s)" in r["error"]
        assert "awq on a mixture of experts runs in one process" in r["moe-awq"]
    # the CLI under torchrun (WORLD_SIZE announces 2 processes): refused before the process group starts
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_cli(quantize_args(tiny_model_dir, sample_text_file, "--algorithm", "gptq", "--calib-samples", "1"), capsys)
    assert code == 2 and "2 processes but 1 calibration sample(s)" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--algorithm", "gptq", "--calib-samples", "4", "--device", "cuda"], "--device cuda with 2 processes on a machine with"),
        (["--scheme", "W4A16"], "needs no calibration: nothing to share over processes"),
        (["--algorithm", "gptq", "--calib-samples", "4", "--onload"], "onloading (--onload, --max-memory, --offload-dir) runs in one process"),
    ],
)
def test_torchrun_input_errors(tiny_model_dir, sample_text_file, capsys, monkeypatch, extra, message):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    code, _, err = run_cli(quantize_args(tiny_model_dir, sample_text_file, *extra), capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_shares_and_assignment():
    assert assign_by_size([4096, 2048, 2048], 2) == [0, 1, 1]  # q | k, v
    assert assign_by_size([8192, 8192], 2) == [0, 1]  # gate | up
    assert assign_by_size([100], 4) == [0]
    assert assign_by_size([5, 9, 9, 1], 3) == [2, 0, 1, 2]
    assert share(10, 4) == slice(0, 10)  # one process: everything


def test_cli_under_torchrun_equals_one_process(tiny_model_dir, sample_text_file, tmp_path, capsys):
    """`torchrun --nproc-per-node 2 lowbit quantize` (SmoothQuant with alpha search, GPTQ, static
    input and KV ranges) saves the model and report one process saves; rank 0 alone writes."""
    calib = tmp_path / "calib.txt"
    calib.write_text(sample_text_file.read_text()[::-1])
    options = ["--scheme", "W8A8sKV8s", "--transform", "smooth", "--alpha", "search", "--algorithm", "gptq"]
    options += ["--calib", str(calib), "--calib-samples", "10", "--calib-seq-len", "16"]
    one, two = tmp_path / "one", tmp_path / "two"
    code, _, err = run_cli(quantize_args(tiny_model_dir, sample_text_file, *options, "--out", str(one)), capsys)
    assert code == 0, err
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "lowbit.cli"]
    run = subprocess.run(
        [*torchrun, *quantize_args(tiny_model_dir, sample_text_file, *options, "--out", str(two))],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("# lowbit report") == 1  # rank 0 alone prints the report
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".two", "two"))) == ["two"]  # no staging left behind
    a, b = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert b["calibration"]["processes"] == 2 and "processes" not in a["calibration"]
    assert b["quantized"]["ppl"] == pytest.approx(a["quantized"]["ppl"], rel=1e-9)
    assert b["transform_args"] == a["transform_args"]  # the same searched alphas
    assert_errors_close(a["layer_errors"], b["layer_errors"])
    (ma, _), (mb, _) = lowbit.load_quantized(one), lowbit.load_quantized(two)
    oa, ob = outcome(ma), outcome(mb)
    measured = {k: max_delta(oa[k], ob[k]) for k in ("weights", "ranges")} | {"logits": (oa["logits"] - ob["logits"]).abs().max().item()}
    print(f"CLI: max |delta| 1 vs 2 processes: {measured}")
    assert oa["ranges"] and all(v <= ATOL for v in measured.values()), measured
