"""One pass per layer: paused forwards (`lowbit.pausable`) give the model the restarting pipeline
gives, bit for bit, on every family and setting it is chosen for; where it cannot apply it is not
chosen, and forcing it says why. Also GPTQ's upper-triangle Hessian sum against a direct one."""

import threading

import pytest
import torch
from conftest import FAMILIES, tiny_model

import lowbit
from lowbit import UserError
from lowbit import pipeline as pipeline_module
from lowbit.algorithms import gptq as gptq_module
from lowbit.algorithms.gptq import GPTQ, GPTQConfig
from lowbit.pausable import PausableCall
from lowbit.pipeline import PipelineConfig
from lowbit.transforms.apply import TransformConfig


def calib(n=10, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (1, length), generator=g) for _ in range(n)]


def probe(seed=9):
    return torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- pausable calls


def test_pausable_calls_run_in_turn_and_return():
    log = []

    def body(name):
        def fn():
            log.append(f"{name}1")
            calls[name].pause()
            log.append(f"{name}2")
            return name.upper()

        return fn

    calls = {n: PausableCall(body(n)) for n in "ab"}
    for n in "ab":
        calls[n].resume()
    log.append("main")
    for n in "ab":
        calls[n].resume()
    assert log == ["a1", "b1", "main", "a2", "b2"]
    assert all(c.done for c in calls.values()) and [calls[n].result for n in "ab"] == ["A", "B"]
    calls["a"].resume()  # a finished call stays finished
    assert calls["a"].result == "A"


def test_pausable_call_errors_reach_the_caller_and_cancel_unwinds():
    def failing():
        raise ValueError("inside")

    call = PausableCall(failing)
    with pytest.raises(ValueError, match="inside"):
        call.resume()
    assert call.done

    cleaned = []

    def paused():
        try:
            holder.pause()
            cleaned.append("resumed")  # never: the call is cancelled
        finally:
            cleaned.append("finally")

    holder = PausableCall(paused)
    holder.resume()
    holder.cancel()
    assert cleaned == ["finally"] and holder.done
    never = PausableCall(lambda: cleaned.append("ran"))
    never.cancel()
    never.resume()
    assert cleaned == ["finally"]


def test_pausable_call_carries_the_thread_count():
    seen = []
    threads = torch.get_num_threads()
    call = PausableCall(lambda: seen.append(torch.get_num_threads()))
    call.resume()
    assert seen == [threads]


# ---------------------------------------------------------------- the pipeline in one pass


def quantize(model, scheme, single_pass, **kwargs):
    config = PipelineConfig(batch_size=3, single_pass=single_pass)
    return lowbit.quantize(model, scheme, calibration=calib(), pipeline=config, progress=False, **kwargs)


def modes_used(monkeypatch) -> list[bool]:
    """Filled with `single_pass` of every layer runner the pipeline builds from now on."""
    used = []
    original = pipeline_module._LayerRunner.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        used.append(self.single_pass)

    monkeypatch.setattr(pipeline_module._LayerRunner, "__init__", spy)
    return used


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])][:5]
    x = probe()
    assert torch.equal(a(x).logits, b(x).logits)
    assert lowbit.quantization_state(a).layer_errors == lowbit.quantization_state(b).layer_errors


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_one_pass_gives_the_restarting_pipelines_model(family, monkeypatch):
    """GPTQ with dynamic 8-bit activations and a 4-bit KV cache: identical weights, errors and
    logits, and the one-pass run really ran each layer once per batch."""
    model = tiny_model(family)
    restarted = quantize(model, "W4A8KV4", False, algorithm="gptq")
    forwards = []
    original = pipeline_module._LayerRunner._batch_forward

    def counting(self, j):
        forwards.append(j)
        return original(self, j)

    monkeypatch.setattr(pipeline_module._LayerRunner, "_batch_forward", counting)
    one = quantize(model, "W4A8KV4", None, algorithm="gptq")
    assert len(forwards) == model.config.num_hidden_layers * 4  # 10 samples in batches of 3
    assert_same_model(one, restarted)
    for layer in one.model.layers:  # no redirection left behind
        assert all("forward" not in m.__dict__ for m in layer.modules())


@torch.no_grad()
@pytest.mark.parametrize(
    "scheme, kwargs",
    [
        ("W4A8s", {}),  # static input ranges, observed at each group's pause
        ("W4fA4fKV4fP1", {"transform": TransformConfig("rotate", fuse_r1=False, fold_norms=False)}),  # online R1, prefix in FP
        ("W4g16A16", {"transform": TransformConfig("smooth", alpha=0.5)}),
    ],
)
def test_one_pass_with_static_inputs_rotations_and_prefix(scheme, kwargs):
    model = tiny_model("qwen2")
    gptq = GPTQConfig(act_order=True)
    assert_same_model(quantize(model, scheme, True, algorithm=gptq, **kwargs), quantize(model, scheme, False, algorithm=gptq, **kwargs))


@torch.no_grad()
def test_one_pass_in_bfloat16_calibration():
    model = tiny_model("llama")
    config = dict(batch_size=3, dtype="bfloat16")
    runs = [
        lowbit.quantize(model, "W4A16", algorithm="gptq", calibration=calib(), pipeline=PipelineConfig(single_pass=s, **config), progress=False)
        for s in (True, False)
    ]
    assert_same_model(*runs)


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_awq_in_one_pass_gives_the_restarting_pipelines_model(family, monkeypatch):
    """AWQ's input scales fold into producers the paused forwards already ran, so the quantized
    linears divide the paused inputs instead: the same model up to float rounding (float64 here, so
    that rounding cannot flip a search; the codes are float32 scales' multiples)."""
    model = tiny_model(family).double()
    used = modes_used(monkeypatch)
    one = quantize(model, "W4g16A16", None, algorithm="awq")
    assert used and all(used)
    restarted = quantize(model, "W4g16A16", False, algorithm="awq")
    x = probe()
    torch.testing.assert_close(one(x).logits, restarted(x).logits, rtol=0, atol=1e-5)
    for a, b in zip(lowbit.quantization_state(one).layer_errors, lowbit.quantization_state(restarted).layer_errors):
        assert a.keys() == b.keys() and all(a[k]["scaled"] for k in a if k != "layer")
        for k in a:
            if k != "layer":
                assert a[k]["awq"] == pytest.approx(b[k]["awq"], rel=1e-5)
    for layer in one.model.layers:  # no dividing hook left behind
        assert all(not m._forward_pre_hooks for m in layer.modules())


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_gptaq_in_one_pass_gives_the_restarting_pipelines_model(family, monkeypatch):
    """GPTAQ's paired streams: each batch's forward and its full-precision twin's pause at every
    group, so both run once per layer; the same weights, errors and logits as restarting both."""
    model = tiny_model(family)
    gptaq = GPTQConfig(asymmetric=True)
    used = modes_used(monkeypatch)
    one = quantize(model, "W4A8KV4", None, algorithm=gptaq)
    assert used and all(used)  # the quantized layers' runners and their twins'
    assert_same_model(one, quantize(model, "W4A8KV4", False, algorithm=gptaq))
    for layer in one.model.layers:
        assert all("forward" not in m.__dict__ and not m._forward_pre_hooks for m in layer.modules())


def test_gptaq_needs_room_for_both_streams_paused(monkeypatch):
    """The twin's paused forwards hold as much as the quantized layer's: the budget counts both."""
    model = tiny_model("llama")
    monkeypatch.setattr(pipeline_module, "_paused_bytes", lambda *args: 10**6)  # one stream's
    room = int(1.5 * 10**6 / pipeline_module.SINGLE_PASS_MEMORY_SHARE)  # the share of it: 1.5 streams
    monkeypatch.setattr(pipeline_module, "available_memory_bytes", lambda: room)
    used = modes_used(monkeypatch)
    quantize(model, "W4A16", None, algorithm="gptq")
    assert used and all(used)
    used.clear()
    quantize(model, "W4A16", None, algorithm=GPTQConfig(asymmetric=True))
    assert used and not any(used)


def test_where_one_pass_does_not_apply(monkeypatch):
    """AWQ in front of a quantized V cache (an input scale folded into v_proj) and static KV ranges
    restart the layer per group; forcing one pass names the reason; a budget below the paused
    activations falls back too."""
    model = tiny_model("llama")
    used = modes_used(monkeypatch)
    cases = [
        ("W4A16KV4", "awq", "awq folds input scales into v_proj"),
        ("W4A8KV8s", "gptq", "static KV-cache ranges"),
    ]
    for scheme, algorithm, reason in cases:
        used.clear()
        quantize(model, scheme, None, algorithm=algorithm)
        assert used and not any(used), (scheme, algorithm)
        with pytest.raises(UserError, match=reason):
            quantize(model, scheme, True, algorithm=algorithm)
    used.clear()
    monkeypatch.setattr(pipeline_module, "available_memory_bytes", lambda: 1000)
    quantize(model, "W4A16", None, algorithm="gptq")
    assert used and not any(used)
    with pytest.raises(UserError, match="paused activations"):
        quantize(model, "W4A16", True, algorithm="gptq")


@pytest.mark.parametrize("algorithm", ["gptq", GPTQConfig(asymmetric=True)], ids=["gptq", "gptaq"])
def test_one_pass_cleans_up_after_an_error(monkeypatch, algorithm):
    """An error while a group is quantized (forwards paused) ends every paused forward's thread,
    the full-precision twin's too (GPTAQ)."""
    calls = {"n": 0}
    original = gptq_module.gptq_quantize

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the third group of the first layer: gate/up
            raise RuntimeError("boom")
        return original(*args, **kwargs)

    monkeypatch.setattr(gptq_module, "gptq_quantize", failing)
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="boom"):
        quantize(tiny_model("llama"), "W4A16", True, algorithm=algorithm)
    assert threading.active_count() == before


def test_a_forward_error_in_one_pass_reaches_the_caller(monkeypatch):
    model = tiny_model("llama")

    def broken(self, *args, **kwargs):
        raise ValueError("attention broke")

    monkeypatch.setattr(type(model.model.layers[0].self_attn), "forward", broken)
    with pytest.raises(ValueError, match="attention broke"):
        quantize(model, "W4A16", True, algorithm="gptq")


# ---------------------------------------------------------------- GPTQ's Hessian from its upper triangle


@pytest.mark.parametrize("columns", [7, 64, 130, 577])
def test_hessian_from_the_upper_triangle_equals_the_full_product(columns):
    g = torch.Generator().manual_seed(columns)
    batches = [torch.randn(2, 40, columns, generator=g) for _ in range(3)]
    gptq = GPTQ(columns)
    for b in batches[:2]:
        gptq.add_batch(b)
    first = gptq.hessian.clone()  # read, then more batches: back to a sum, then read again
    gptq.add_batch(batches[2])
    x = torch.cat([b.reshape(-1, columns) for b in batches]).double()
    direct = (2 / x.shape[0]) * x.T @ x
    assert torch.equal(gptq.hessian, gptq.hessian.T)
    assert torch.allclose(gptq.hessian.double(), direct, rtol=1e-5, atol=1e-5 * direct.abs().max().item())
    x2 = x[:160].double()
    assert torch.allclose(first.double(), (2 / 160) * x2.T @ x2, rtol=1e-5, atol=1e-5 * direct.abs().max().item())


def test_default_batch_size_follows_the_mode():
    assert PipelineConfig().batch(single_pass=True) == 16 and PipelineConfig().batch(single_pass=False) == 4
    assert PipelineConfig(batch_size=3).batch(single_pass=True) == 3
