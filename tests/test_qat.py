"""LLM-QAT: generation strategies, resumable sharded generation, STE gradients, training resume, DDP."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model, word_tokenizer
from safetensors.torch import load_file
from torch import nn

import lowbit
from lowbit.data.generate import Sampling, generate_batch
from lowbit.errors import UserError
from lowbit.qat import (
    DatagenConfig,
    TrainConfig,
    distill,
    generate_dataset,
    load_dataset,
    train,
)
from lowbit.qat import datagen as datagen_module
from lowbit.qat.train import freeze_student, learn_weight_scales, trainable_parameters
from lowbit.quant import fake_quantize
from lowbit.runtime import QuantLinear, TensorQuantizer

V = 64


class BigramModel(nn.Module):
    """A constructed LM: the next token depends only on the last one. The greedy successor of v is
    v + 1 (mod V) with probability 0.05; every other token has 0.95 / (V - 1) < 0.05, so a
    sampled token is almost never the greedy one."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=V)
        self.dummy = nn.Parameter(torch.zeros(1))
        probs = torch.full((V, V), 0.95 / (V - 1))
        probs[torch.arange(V), (torch.arange(V) + 1) % V] = 0.05
        self.register_buffer("table", probs.log())

    def forward(self, input_ids, past_key_values=None, use_cache=True):
        return SimpleNamespace(logits=self.table[input_ids], past_key_values=None)


class NoSpecial:
    all_special_ids = ()
    eos_token_id = None

    def __len__(self) -> int:
        return V


def _greedy_mask(seqs: torch.Tensor) -> torch.Tensor:
    """[n, length - 1]: True where token t + 1 is the greedy successor of token t."""
    return seqs[:, 1:] == (seqs[:, :-1] + 1) % V


def test_hybrid_is_greedy_for_k_tokens_then_sampled():
    n, length = 200, 12
    seqs = torch.cat(generate_batch(BigramModel(), NoSpecial(), n, length, torch.Generator().manual_seed(0), Sampling(greedy_tokens=(4,))))
    greedy = _greedy_mask(seqs)
    assert greedy[:, :4].all()  # tokens 2..5 (after the random start) are top-1
    assert greedy[:, 4:].float().mean() < 0.1  # then sampled: the greedy token has probability 0.05
    again = torch.cat(generate_batch(BigramModel(), NoSpecial(), n, length, torch.Generator().manual_seed(0), Sampling(greedy_tokens=(4,))))
    assert torch.equal(seqs, again)  # seeded

    mixed = torch.cat(generate_batch(BigramModel(), NoSpecial(), n, length, torch.Generator().manual_seed(1), Sampling()))
    run = _greedy_mask(mixed).int().cumprod(1).sum(1)  # leading greedy tokens per sequence
    assert run.min() >= 3 and {3, 4, 5} <= set(run.tolist())  # k drawn from {3, 4, 5} (+ rare sampled hits)


def test_greedy_and_sample_strategies():
    gen = torch.Generator().manual_seed(0)
    top1 = torch.cat(generate_batch(BigramModel(), NoSpecial(), 50, 10, gen, Sampling(strategy="greedy")))
    assert _greedy_mask(top1).all()
    sampled = torch.cat(generate_batch(BigramModel(), NoSpecial(), 200, 10, gen, Sampling(strategy="sample")))
    assert _greedy_mask(sampled).float().mean() < 0.1
    with pytest.raises(UserError, match="strategy"):
        Sampling(strategy="beam").check()


def test_stop_at_eos_ends_sequences():
    model = tiny_model("llama")
    tok = word_tokenizer()
    seqs = generate_batch(model, tok, 8, 40, torch.Generator().manual_seed(0), Sampling(stop_at_eos=True, temperature=3.0))
    for s in seqs:
        s = s.view(-1)
        assert 1 <= s.numel() <= 40
        assert (s[:-1] != tok.eos_token_id).all()  # nothing after the first end of sequence
        assert s.numel() == 40 or s[-1] == tok.eos_token_id


def _config(**kw) -> DatagenConfig:
    base = {"samples": 7, "max_length": 10, "shard_size": 3, "batch_size": 2, "seed": 3, "sampling": Sampling(stop_at_eos=True)}
    return DatagenConfig(**{**base, **kw})


def test_resumed_generation_writes_the_same_shards(tmp_path, monkeypatch):
    model, tok = tiny_model("llama"), word_tokenizer()
    full = tmp_path / "full"
    stats = generate_dataset(model, tok, full, _config(), progress=False)
    assert stats["sequences"] == 7 and len(list(full.glob("shard-*.safetensors"))) == 3

    calls = {"n": 0}
    real = datagen_module.generate_batch

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # inside the second shard
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    part = tmp_path / "part"
    monkeypatch.setattr(datagen_module, "generate_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(model, tok, part, _config(), progress=False)
    assert sorted(p.name for p in part.iterdir()) == ["meta.json", "shard-00000.safetensors"]  # no half-written shard
    with pytest.raises(UserError, match="incomplete"):
        load_dataset(part)
    monkeypatch.setattr(datagen_module, "generate_batch", real)
    generate_dataset(model, tok, part, _config(), progress=False)
    for i in range(3):
        a = load_file(full / f"shard-{i:05d}.safetensors")
        b = load_file(part / f"shard-{i:05d}.safetensors")
        assert torch.equal(a["ids"], b["ids"]) and torch.equal(a["lengths"], b["lengths"])
    assert [s.tolist() for s in load_dataset(full)] == [s.tolist() for s in load_dataset(part)]
    with pytest.raises(UserError, match="other settings"):
        generate_dataset(model, tok, part, _config(seed=4), progress=False)


def test_dataset_stats():
    seqs = [torch.tensor([1, 2, 3, 1, 2]), torch.tensor([1, 2])]
    stats = datagen_module.dataset_stats(seqs)
    assert stats["sequences"] == 2 and stats["tokens"] == 7 and stats["length"]["max"] == 5
    assert stats["distinct_ngram_ratio"]["1"] == pytest.approx(3 / 7)
    assert stats["distinct_ngram_ratio"]["2"] == pytest.approx(3 / 5)  # (1,2) x3, (2,3), (3,1)


def _student(model, scheme="W4A4KV4", **kw):
    return lowbit.quantize(model, scheme, trainable=True, progress=False, **kw)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_trainable_student_matches_ptq_and_gradients_pass_every_quantizer(family):
    model = tiny_model(family)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    student = _student(model, transform="rotate")
    ptq = lowbit.quantize(model, "W4A4KV4", transform="rotate", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, ptq(input_ids=ids).logits, rtol=1e-4, atol=1e-4)

    quantizers = [m for m in student.modules() if isinstance(m, TensorQuantizer)]
    kv = [m for m in quantizers if m not in {q.input_quant for q in student.modules() if isinstance(q, QuantLinear)}]
    assert kv and len(quantizers) > len(kv)  # both activation and KV quantizers are in the graph
    seen = []

    def straight_through(module, grad_input, grad_output):
        seen.append(module)
        torch.testing.assert_close(grad_input[0], grad_output[0], rtol=0, atol=0)

    for q in quantizers:
        q.register_full_backward_hook(straight_through)
    params = trainable_parameters(student)
    embeds = student.get_input_embeddings()(ids).detach().requires_grad_(True)  # so layer 0's inputs carry gradients too
    student(inputs_embeds=embeds).logits.logsumexp(-1).mean().backward()
    assert {id(q) for q in seen} == {id(q) for q in quantizers}  # every quantizer passed a gradient, unchanged
    linears = [m for m in student.modules() if isinstance(m, QuantLinear)]
    for m in linears:  # layer 0's weights get gradients only through layer 1's A and KV quantizers
        assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in student.named_parameters() if n not in params)


@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_trainable_student_from_a_calibrated_start(algorithm):
    """QAT from GPTQ/AWQ starts exactly at that model, trains on its fixed grid and freezes onto it."""
    model = tiny_model("llama")
    calib = [torch.randint(0, 512, (1, 16)) for _ in range(4)]
    ptq = lowbit.quantize(model, "W4A8KV4", algorithm=algorithm, calibration=calib, progress=False)
    student = lowbit.quantize(model, "W4A8KV4", algorithm=algorithm, calibration=calib, trainable=True, progress=False)
    x = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        assert torch.equal(student(x).logits, ptq(x).logits)
    linear = next(m for m in student.model.layers.modules() if isinstance(m, QuantLinear))
    assert linear.trainable and linear.weight_scale is not None
    linear.weight.requires_grad_(True)
    student(x).logits.pow(2).mean().backward()
    assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0
    with torch.no_grad():
        linear.weight.add_(linear.weight.grad.sign() * linear.weight_scale * 0.7)  # more than half a step: codes move
    grid = linear.weight_scale.clone()
    moved = linear.weight.detach().clone()
    from lowbit.qat import freeze_student

    freeze_student(student)
    assert linear.is_quantized and not linear.trainable
    assert torch.equal(linear.weight_scale, grid.reshape(-1))  # the frozen codes sit on the PTQ grid
    frozen = linear.dense_weight()
    assert not torch.equal(frozen, ptq.model.layers[0].self_attn.q_proj.dense_weight())  # training moved it
    assert torch.allclose(frozen, (moved / grid).round().clamp(-8, 7) * grid)


def test_weight_quantizer_is_straight_through():
    model = tiny_model("llama")
    student = _student(model, "W4A16")
    linear = next(m for m in student.modules() if isinstance(m, QuantLinear))
    x = torch.randn(3, linear.in_features)
    linear.weight.requires_grad_(True)
    linear(x).pow(2).sum().backward()
    wq = linear.dense_weight().detach().requires_grad_(True)
    torch.nn.functional.linear(x, wq).pow(2).sum().backward()
    torch.testing.assert_close(linear.weight.grad, wq.grad)  # d loss / d latent = d loss / d quantized weight
    assert not torch.equal(linear.weight.detach(), wq.detach())  # the latent weight is full precision
    linear.freeze()
    assert torch.equal(linear.dense_weight(), wq.detach()) and not linear.trainable and linear.weight is None


def _data(n=8, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 512, (length - i % 3,), generator=g) for i in range(n)]


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_training_lowers_the_distillation_loss():
    teacher = tiny_model("llama")
    student = _student(teacher, "W4A8KV4")
    summary = train(student, teacher, _data(), TrainConfig(steps=12, batch_size=4, lr=3e-3, schedule="constant"), progress=False)
    losses = [h["loss"] for h in summary["history"]]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("learn_scales", [False, True])
def test_checkpoint_resume_is_exact(tmp_path, monkeypatch, learn_scales):
    teacher = tiny_model("llama")
    config = TrainConfig(
        steps=4,
        batch_size=4,
        grad_accum=2,
        lr=1e-3,
        warmup_steps=1,
        checkpoint_every=2,
        learn_scales=learn_scales,
        scale_lr=1e-4 if learn_scales else None,
    )
    straight = _student(teacher, "W4A8KV4")
    train(straight, teacher, _data(), config, checkpoint_dir=tmp_path / "a", progress=False)

    calls = {"n": 0}
    real = distill.soft_cross_entropy

    def crash(*args):
        calls["n"] += 1
        if calls["n"] == 6:  # step 3, first micro-batch
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(distill, "soft_cross_entropy", crash)
    with pytest.raises(KeyboardInterrupt):
        train(_student(teacher, "W4A8KV4"), teacher, _data(), config, checkpoint_dir=tmp_path / "b", progress=False)
    monkeypatch.setattr(distill, "soft_cross_entropy", real)
    resumed = _student(teacher, "W4A8KV4")
    summary = train(resumed, teacher, _data(), config, checkpoint_dir=tmp_path / "b", progress=False)
    assert [h["step"] for h in summary["history"]] == [1, 2, 3, 4]
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    with pytest.raises(UserError, match="other training settings"):
        train(
            _student(teacher, "W4A8KV4"), teacher, _data(), TrainConfig(steps=4, batch_size=4, lr=5e-3), checkpoint_dir=tmp_path / "b", progress=False
        )


@pytest.mark.parametrize("scheme", ["W4A16", "W4g16A16", "W3aA16"])
def test_learned_scale_quantizer_matches_and_passes_gradients(scheme):
    from lowbit.quant.fake import QParams, as_rows, compute_qparams, learned_fake_quantize

    args = lowbit.parse_scheme(scheme).weights
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    qp = compute_qparams(as_rows(w, args), args)
    scale = qp.scale.clone() * 0.8  # some values now fall outside the range and clamp
    scale.requires_grad_(True)
    x = w.clone().requires_grad_(True)
    out = learned_fake_quantize(x, args, QParams(scale, qp.zero))
    assert torch.equal(out, fake_quantize(w, args, QParams(scale.detach(), qp.zero)))
    out.sum().backward()  # d/dx = 1 where the value is in range, 0 where it clamps
    assert scale.grad is not None and scale.grad.abs().sum() > 0
    v = (as_rows(w, args) - qp.zero) / scale.detach()
    clamped = ((v.round() < args.qmin) | (v.round() > args.qmax)).reshape(w.shape)
    assert clamped.any() and (x.grad[clamped] == 0).all() and (x.grad[~clamped] == 1).all()


@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
def test_learned_scales_start_unchanged_train_and_freeze_onto_a_grid(algorithm):
    teacher = tiny_model("llama")
    calib = [torch.randint(0, 512, (1, 16)) for _ in range(4)] if algorithm == "gptq" else None
    student = lowbit.quantize(teacher, "W4A8KV4", algorithm=algorithm, calibration=calib, trainable=True, progress=False)
    x = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        start = student(x).logits
    learn_weight_scales(student)
    linears = [m for m in student.model.layers.modules() if isinstance(m, QuantLinear)]
    assert all(m.learns_weight_scale for m in linears)
    with torch.no_grad():
        assert torch.allclose(student(x).logits, start, atol=1e-6)  # the same grid, now a parameter
    scales = {id(m): m.weight_scale.detach().clone() for m in linears}
    params = trainable_parameters(student)
    assert sum(n.endswith("weight_scale") for n in params) == len(linears)
    config = TrainConfig(steps=10, batch_size=4, lr=3e-3, schedule="constant", learn_scales=True, scale_lr=1e-3)
    losses = [h["loss"] for h in train(student, teacher, _data(), config, progress=False)["history"]]
    assert losses[-1] < losses[0]
    assert all(not torch.equal(m.weight_scale, scales[id(m)]) for m in linears)  # the scales learned
    student.eval()
    with torch.no_grad():
        trained = student(x).logits
    freeze_student(student)
    assert all(m.is_quantized and not m.trainable and not m.learns_weight_scale for m in linears)  # 4-bit codes
    assert all(torch.equal(m.weight_scale, m.weight_scale.float()) for m in linears)  # the learned scales, stored
    with torch.no_grad():
        assert torch.allclose(student(x).logits, trained, atol=1e-5)  # freezing keeps the trained function


@pytest.mark.parametrize("scheme", ["Wnvfp4Afp8KV8", "Wmxfp4A16", "Wfp8g16hA16"])
@pytest.mark.parametrize("learn_scales", [False, True])
def test_qat_on_floating_point_formats_trains_and_freezes_exactly(scheme, learn_scales):
    teacher = tiny_model("llama")
    student = lowbit.quantize(teacher, scheme, trainable=True, progress=False)
    if learn_scales:
        learn_weight_scales(student)
    scales = {"learn_scales": True, "scale_lr": 1e-3} if learn_scales else {}
    config = TrainConfig(steps=6, batch_size=4, lr=3e-3, schedule="constant", **scales)
    linears = [m for m in student.model.layers.modules() if isinstance(m, QuantLinear)]
    start = {id(m): m.weight.detach().clone() for m in linears}
    losses = [h["loss"] for h in train(student, teacher, _data(), config, progress=False)["history"]]
    assert all(math.isfinite(v) for v in losses)
    assert all(not torch.equal(m.weight, start[id(m)]) for m in linears)  # gradients reached every latent weight
    x = torch.randint(0, 512, (2, 12))
    student.eval()
    with torch.no_grad():
        trained = student(x).logits
    freeze_student(student)
    assert all(m.is_quantized for m in linears)
    with torch.no_grad():  # the forward trained on scales rounded to their format: freezing keeps it
        assert torch.allclose(student(x).logits, trained, atol=1e-5)


def test_scale_lr_needs_learn_scales():
    with pytest.raises(UserError, match="learn_scales"):
        TrainConfig(scale_lr=1e-4).check()


@pytest.mark.parametrize("losses", [{"label": 1.0}, {"logits": 1.0, "hidden": 0.5}, {"attention": 1.0}])
def test_other_losses_train(losses):
    teacher = tiny_model("llama")
    student = _student(teacher, "W4A8KV4")
    before = _weights(student)
    summary = train(student, teacher, _data(), TrainConfig(steps=2, batch_size=2, lr=1e-3, losses=losses), progress=False)
    assert all(h["loss"] > 0 for h in summary["history"])
    assert any(not torch.equal(before[n], p) for n, p in student.named_parameters())


def test_teacher_topk_matches_full_logits_for_full_k():
    teacher = tiny_model("llama")
    a, b = _student(teacher, "W4A8KV4"), _student(teacher, "W4A8KV4")
    base = {"steps": 2, "batch_size": 2, "lr": 1e-3}
    la = train(a, teacher, _data(), TrainConfig(**base), progress=False)["history"]
    lb = train(b, teacher, _data(), TrainConfig(**base, teacher_topk=512), progress=False)["history"]
    assert [h["loss"] for h in la] == pytest.approx([h["loss"] for h in lb], rel=1e-4)


def _ddp_data() -> list[torch.Tensor]:
    return [torch.randint(2, 512, (10,), generator=torch.Generator().manual_seed(i)) for i in range(8)]


def _distributed_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    teacher = tiny_model("llama")
    for mode in ("ddp", "fsdp", "fsdp-resumed", "fsdp-scales"):
        student = _student(teacher, "W4A8KV4")
        # constant lr: a run of 2 steps is then the first 2 steps of a run of 3
        config = TrainConfig(steps=3, batch_size=4, lr=1e-3, schedule="constant", fsdp=mode != "ddp", learn_scales=mode == "fsdp-scales")
        if mode == "fsdp-resumed":  # stop after 2 steps (checkpoint), then a fresh student resumes to 3
            ckpt = os.path.join(out, "ckpt")
            train(student, teacher, _ddp_data(), replace(config, steps=2), checkpoint_dir=ckpt, progress=False)
            student = _student(teacher, "W4A8KV4")
            train(student, teacher, _ddp_data(), config, checkpoint_dir=ckpt, progress=False)
        else:
            train(student, teacher, _ddp_data(), config, progress=False)
        weights = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in student.named_parameters()}
        torch.save(weights, os.path.join(out, f"{mode}{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_and_fsdp_two_processes_agree_with_each_other_and_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(2, f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=2, join=True)
    teacher = tiny_model("llama")
    single = _student(teacher, "W4A8KV4")
    train(single, teacher, _ddp_data(), TrainConfig(steps=3, batch_size=4, lr=1e-3, schedule="constant"), progress=False)
    start = _weights(_student(teacher, "W4A8KV4"))
    with_scales = _student(teacher, "W4A8KV4")
    train(with_scales, teacher, _ddp_data(), TrainConfig(steps=3, batch_size=4, lr=1e-3, schedule="constant", learn_scales=True), progress=False)
    for mode in ("ddp", "fsdp", "fsdp-resumed", "fsdp-scales"):
        r0, r1 = torch.load(tmp_path / f"{mode}0.pt"), torch.load(tmp_path / f"{mode}1.pt")
        assert all(torch.equal(r0[n], r1[n]) for n in r0), mode
        reference = _weights(with_scales if mode == "fsdp-scales" else single)
        assert set(r0) == set(reference), mode  # with scales: the learned weight scales too
        for n, p in reference.items():  # the same global batches: the same update, up to float summation order
            torch.testing.assert_close(r0[n], p, rtol=1e-4, atol=1e-6)
        assert any(not torch.equal(start[n], r0[n]) for n in start)
    assert any(n.endswith("weight_scale") for n in _weights(with_scales))
    # an FSDP checkpoint (gathered weights and optimizer state) resumes the sharded run exactly
    whole, resumed = torch.load(tmp_path / "fsdp0.pt"), torch.load(tmp_path / "fsdp-resumed0.pt")
    assert all(torch.equal(whole[n], resumed[n]) for n in whole)


def test_cli_qat_under_torchrun_with_fsdp(tiny_model_dir, sample_text_file, tmp_path):
    """`torchrun --nproc_per_node 2 lowbit qat --fsdp --learn-scales` (gloo on CPU): rank 0 gathers the
    sharded student (learned scales included), evaluates it and saves it; the saved model reloads to
    the reported perplexity."""
    import subprocess
    import sys

    import lowbit
    from lowbit.data import load_text, tokenize

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    lowbit_cli = [sys.executable, "-m", "lowbit.cli"]
    data = tmp_path / "gen"
    gen = subprocess.run(
        [
            *lowbit_cli,
            "-q",
            "generate-data",
            "--model",
            str(tiny_model_dir),
            "--out",
            str(data),
            "--samples",
            "8",
            "--max-length",
            "12",
            "--batch-size",
            "4",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert gen.returncode == 0, gen.stderr
    out = tmp_path / "run"
    qat = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "lowbit.cli",
            "-q",
            "qat",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(data),
            "--scheme",
            "W4A8KV4",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--lr",
            "1e-3",
            "--fsdp",
            "--learn-scales",
            "--checkpoint-every",
            "1",
            "--eval-data",
            str(sample_text_file),
            "--windows",
            "2",
            "--seq-len",
            "32",
            "--out",
            str(out),
            "--no-fp",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert qat.returncode == 0, qat.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["qat"]["processes"] == 2 and report["qat"]["config"]["fsdp"] and report["qat"]["steps"] == 2
    assert report["qat"]["config"]["learn_scales"]
    assert report["quantized"]["ppl"] != report["ptq"]["ppl"]
    student, tokenizer = lowbit.load_quantized(out)
    ids = tokenize(tokenizer, load_text(str(sample_text_file), split="eval"))
    assert lowbit.perplexity(student, ids, 32, 2, progress=False).ppl == pytest.approx(report["quantized"]["ppl"], rel=1e-6)


def test_cli_generate_data_and_qat(tiny_model_dir, sample_text_file, tmp_path):
    from click.testing import CliRunner

    from lowbit.cli import cli

    runner = CliRunner()
    data = tmp_path / "gen"
    result = runner.invoke(
        cli,
        [
            "-q",
            "generate-data",
            "--model",
            str(tiny_model_dir),
            "--out",
            str(data),
            "--samples",
            "6",
            "--max-length",
            "12",
            "--shard-size",
            "4",
            "--batch-size",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["stats"]["sequences"] == 6
    out = tmp_path / "run"
    result = runner.invoke(
        cli,
        [
            "-q",
            "qat",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(data),
            "--scheme",
            "W4A8KV4",
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--lr",
            "1e-3",
            "--eval-data",
            str(sample_text_file),
            "--windows",
            "2",
            "--seq-len",
            "32",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert {"fp", "ptq", "quantized", "qat", "eval"} <= set(report) and report["qat"]["steps"] == 3
    assert not (tmp_path / "run.checkpoints").exists()
    # the trained student is saved like any lowbit model and reloads to the reported perplexity
    import lowbit
    from lowbit.data import load_text, tokenize

    student, tokenizer = lowbit.load_quantized(out)
    ids = tokenize(tokenizer, load_text(str(sample_text_file), split="eval"))
    assert lowbit.perplexity(student, ids, 32, 2, progress=False).ppl == pytest.approx(report["quantized"]["ppl"], rel=1e-6)


def test_cli_qat_bad_input_is_a_clear_error(tmp_path):
    import subprocess
    import sys

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "lowbit.cli", *args], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        )

    missing = run("qat", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"))
    assert missing.returncode == 2 and "lowbit generate-data" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    loss = run("qat", "--data", str(tmp_path), "--loss", "kl", "--out", str(tmp_path / "o"))
    assert loss.returncode == 2 and "logits" in loss.stderr
    assert not (tmp_path / "o").exists()


def test_int_kernels_refuse_an_unfrozen_student_and_take_a_frozen_one():
    from lowbit.qat import freeze_student
    from lowbit.runtime.int_linear import convert_to_int_kernels

    model = tiny_model("llama")
    student = _student(model, "W8A8")
    with pytest.raises(UserError, match="freeze_student"):
        convert_to_int_kernels(student)
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        fake = freeze_student(student)(input_ids=ids).logits
        real = convert_to_int_kernels(student)(input_ids=ids).logits
    torch.testing.assert_close(real, fake, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("scheme", ["W4g16A16", "W3g32aA16"])
def test_calibrated_start_on_group_grids(scheme):
    """Per-group (symmetric and asymmetric) GPTQ grids are kept too: step 0 = the PTQ model, and the
    frozen weights are exact codes of the same scheme."""
    from lowbit.qat import freeze_student

    model = tiny_model("qwen2")
    calib = [torch.randint(0, 512, (1, 16)) for _ in range(4)]
    ptq = lowbit.quantize(model, scheme, algorithm="gptq", calibration=calib, progress=False)
    student = lowbit.quantize(model, scheme, algorithm="gptq", calibration=calib, trainable=True, progress=False)
    x = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        assert torch.equal(student(x).logits, ptq(x).logits)
        linear = next(m for m in student.model.layers.modules() if isinstance(m, QuantLinear))
        grid = linear.weight_scale.clone()
        linear.weight.add_(torch.randn_like(linear.weight) * linear.weight.abs().mean())
    freeze_student(student)
    frozen = linear.quantized_weight  # codes of the same scheme on the PTQ grid
    assert frozen.args == lowbit.parse_scheme(scheme).weights and torch.equal(frozen.qparams.scale, grid)
    args = frozen.args
    assert frozen.codes.min() >= args.qmin and frozen.codes.max() <= args.qmax


def test_generated_calibration_joins_sequences_of_any_length_into_equal_windows():
    """Generated sequences stop at end of sequence, so their lengths differ; GPTQ/AWQ starts need
    one length: the sequences are joined in order and cut, no token invented or reordered."""
    from lowbit.qat.datagen import generated_calibration

    data = [torch.arange(n) + 10 * n for n in (5, 9, 3, 12, 7)]  # 36 tokens
    windows = generated_calibration(data, samples=4, seq_len=8)
    assert [tuple(w.shape) for w in windows] == [(1, 8)] * 4
    assert torch.equal(torch.cat([w.reshape(-1) for w in windows]), torch.cat(data)[:32])
    assert len(generated_calibration(data, samples=10, seq_len=8)) == 4  # as many as the tokens allow
    assert tuple(generated_calibration(data, samples=2, seq_len=100)[0].shape) == (1, 36)
    with pytest.raises(UserError, match="too few"):
        generated_calibration([torch.tensor([1])], samples=2, seq_len=8)
    model = tiny_model("llama")  # the windows feed the layer-by-layer pipeline
    lowbit.quantize(model, "W4A8KV4", algorithm="gptq", calibration=windows, progress=False)
