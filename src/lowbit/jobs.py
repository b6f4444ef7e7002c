"""The jobs behind the CLI commands, as plain functions that return report dicts."""

from __future__ import annotations

import copy
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .algorithms.registry import get_algorithm
from .api import check_scheme, check_scheme_for_config, quantize
from .arch import decoder_layers, expert_dims, get_arch, get_module, head_dim, is_moe_layer, layer_linear_names
from .data import (
    DEFAULT_DATA,
    GENERATED,
    calibration_batches,
    generate_samples,
    load_text,
    tokenize,
)
from .distributed import broadcast_object, check_device, check_processes, init_distributed, launched_processes, rank, world_size
from .errors import UserError
from .evaluation import (
    kv_cache_bytes,
    model_ops,
    model_size_bytes,
    offline_tasks,
    perplexity,
    scheme_cost,
    weight_bits,
)
from .evaluation.harness import HarnessConfig, evaluate_tasks, load_tasks
from .evaluation.perplexity import eval_windows
from .io.export import export_dtype
from .io.native import RUN_SUBDIR, load_quantized, save_quantized, saved_model_dir
from .memory import available_memory_bytes, peak_rss_bytes, release_freed_memory
from .models import cast_model, check_window, load_config, load_model, resolve_model
from .onload import Checkpoint, build_skeleton
from .pipeline import PipelineConfig
from .recipes import Recipe
from .runtime.int_linear import check_integer_formats, convert_to_int_kernels
from .runtime.state import quantization_state
from .scheme import Scheme
from .streaming import OnloadSettings, activation_bytes, check_offload_space, perplexity_onloaded, quantize_onloaded
from .transforms.apply import check_transform
from .version import __version__

log = logging.getLogger("lowbit")

KV_CONTEXTS = (2048, 8192, 32768)


def cost_summary(model: nn.Module, scheme: Scheme | None, seq_len: int) -> dict:
    ops = model_ops(model, scheme, seq_len)
    return {
        "size_bytes": model_size_bytes(model),
        "bits_per_weight": weight_bits(model),
        "ops": ops.ops,
        "macs": ops.macs,
        "ops_seq_len": seq_len,
        "kv_cache_bytes": {str(c): kv_cache_bytes(model.config, scheme, c) for c in KV_CONTEXTS},
    }


def recipe_report(model_name: str, recipe: Recipe) -> dict:
    """The first fields of a quantize or qat report: what was quantized, and how."""
    return {
        "lowbit_version": __version__,
        "model": model_name,
        "scheme": recipe.scheme.name,
        "scheme_args": recipe.scheme.to_dict(),
        "formats": recipe.scheme.formats(),
        "transform": recipe.transform.kind,
        "algorithm": recipe.algorithm,
    }


def save_model(model: nn.Module, save_to: str | Path, tokenizer) -> dict:
    """Save a quantized model (lowbit's native format) for a run folder; its report entry."""
    saved = save_quantized(model, save_to, tokenizer)
    return {"path": RUN_SUBDIR, "bytes_on_disk": sum(f.stat().st_size for f in saved.iterdir())}


@dataclass(frozen=True)
class EvalSettings:
    """What perplexity is measured on: a text (None: the default), how many windows of how many tokens."""

    data: str | None = None
    windows: int | None = 8  # None: every window
    seq_len: int = 2048


@dataclass(frozen=True)
class CalibrationSettings:
    """What calibration runs on: a text, a dataset or 'generated' (None: the default text)."""

    data: str | None = None
    samples: int = 128
    seq_len: int = 512


def quantize_job(
    model_name: str,
    recipe: Recipe,
    *,
    evaluation: EvalSettings = EvalSettings(),
    calibration: CalibrationSettings = CalibrationSettings(),
    pipeline: PipelineConfig | None = None,
    seed: int = 0,
    evaluate_fp: bool = True,
    progress: bool = True,
    save_to: str | Path | None = None,
    onload: OnloadSettings | None = None,
) -> dict:
    """Load, quantize and evaluate; returns the report (the report contract in the README). With `save_to`, the
    quantized model and tokenizer are also saved there (`lowbit.io`).

    The model is quantized in place after the FP evaluation, so only one copy is ever in memory,
    and its quantized weights are held as codes and scales. With `onload` (or when the model in
    float32 would not fit in the available memory) it is read from disk one decoder layer at a
    time instead (`lowbit.streaming`): the same numbers, a fraction of the memory.

    Under torchrun each process calibrates on its share of the samples (`lowbit.distributed`);
    rank 0 alone evaluates, saves and returns the report, the others return {}. Onloading runs in
    one process only."""
    start = time.time()
    pipeline = pipeline or PipelineConfig()
    calibrated = get_algorithm(recipe.algorithm).calibrated
    needs_calib = recipe.scheme.needs_calibration or recipe.transform.needs_calibration or calibrated
    if launched_processes() > 1:  # before the process group and the model: input errors first
        if not needs_calib:
            raise UserError(
                f"{recipe.scheme.name} with {recipe.algorithm} and transform {recipe.transform.kind} needs no calibration: "
                "nothing to share over processes; run it without torchrun"
            )
        check_processes(calibration.samples)
        check_device(pipeline.device)
        if onload is not None:
            raise UserError("layer-by-layer onloading (--onload, --max-memory, --offload-dir) runs in one process; run it without torchrun")
    init_distributed()
    main = rank() == 0
    progress = progress and main
    torch.manual_seed(seed)
    config = load_config(model_name)  # before the weights load: the window, the scheme's groups and blocks
    check_window(config, evaluation.seq_len)
    check_scheme_for_config(config, recipe.scheme)
    onload = _choose_onload(model_name, onload, world_size())
    if onload is not None and world_size() > 1:  # every process would load the whole model
        raise UserError(
            f"{model_name} does not fit in memory once per process ({world_size()} processes); layer-by-layer onloading "
            "runs in one process: run it without torchrun (or with fewer processes, on a machine with more memory)"
        )
    if onload is not None:
        return _quantize_onloaded_job(
            model_name, recipe, config, evaluation, calibration, pipeline, seed, evaluate_fp, progress, save_to, onload, start
        )
    log.info("loading %s", model_name)
    model, tokenizer = load_model(model_name)
    spec = get_arch(model)
    check_scheme(model, spec, recipe.scheme)  # fail before the slow part
    check_transform(model, spec, recipe.transform)
    data, windows, seq_len = evaluation.data, evaluation.windows, evaluation.seq_len
    data_name = data or DEFAULT_DATA
    eval_ids = None
    if main:  # rank 0 alone evaluates
        log.info("tokenizing evaluation text %s", data_name)
        eval_ids = tokenize(tokenizer, load_text(data, split="eval"))
        release_freed_memory()  # the tokenizer's temporaries for a whole text are large
    report = recipe_report(model_name, recipe)
    if evaluate_fp and main:
        log.info("evaluating full precision")
        fp = perplexity(model, eval_ids, seq_len, windows, progress=progress, desc="perplexity FP")
        report["fp"] = {"ppl": fp.ppl, **cost_summary(model, None, seq_len)}
    batches = None
    if calibrated:
        pipeline.check()
    if needs_calib:
        t0 = time.time()
        calib, samples, calib_len = calibration.data, calibration.samples, calibration.seq_len
        if calib == GENERATED:
            log.info("calibration: %d sequences x %d tokens generated by the model itself", samples, calib_len)
            # rank 0 generates and sends: every rank then holds the same samples and takes its share
            generated = generate_samples(model, tokenizer, samples, calib_len, seed=seed, progress=progress) if main else None
            batches = broadcast_object(generated, src=0)
        else:
            log.info("calibration text %s: %d samples x %d tokens", calib or DEFAULT_DATA, samples, calib_len)
            batches = calibration_batches(tokenizer, calib, samples, calib_len, seed)
            release_freed_memory()
        report["calibration"] = {"data": calib or DEFAULT_DATA, "samples": samples, "seq_len": calib_len, "seconds": time.time() - t0}
        if calibrated:
            report["calibration"]["dtype"] = pipeline.dtype
        if world_size() > 1:
            report["calibration"]["processes"] = world_size()
    log.info("quantizing to %s with %s", recipe.scheme.name, recipe.algorithm)
    t0 = time.time()
    qmodel = quantize(model, recipe, calibration=batches, pipeline=pipeline, inplace=True, progress=progress)
    quant_seconds = time.time() - t0
    del model, batches
    release_freed_memory()
    if not main:  # every rank holds the same quantized model; rank 0 evaluates and saves it
        return {}
    log.info("evaluating quantized model")
    q = perplexity(qmodel, eval_ids, seq_len, windows, progress=progress, desc="perplexity quantized")
    report["eval"] = {"data": data_name, "windows": q.windows, "seq_len": seq_len, "tokens": q.tokens}
    report["quantized"] = {"ppl": q.ppl, **cost_summary(qmodel, recipe.scheme, seq_len), "quantize_seconds": quant_seconds}
    state = quantization_state(qmodel)
    report["transform_args"] = state.transform
    if state.algorithm_config:
        report["algorithm_args"] = state.algorithm_config
    if state.layer_errors:
        report["layer_errors"] = state.layer_errors
    if save_to is not None:
        report["saved_model"] = save_model(qmodel, save_to, tokenizer)
    report["seconds"] = time.time() - start
    report["peak_rss_bytes"] = peak_rss_bytes()
    return report


def _choose_onload(model_name: str, onload: OnloadSettings | None, processes: int = 1) -> OnloadSettings | None:
    """`onload` as given; None (automatic) turns into onloading when the model in float32 (once per
    process) would take more than 80% of the memory available now."""
    if onload is not None:
        return onload
    folder = Path(resolve_model(model_name))
    if not folder.is_dir():
        return None
    needed, available = Checkpoint(folder).float32_bytes(), available_memory_bytes()
    if available is not None and needed * processes > 0.8 * available:
        log.info("%s takes %.1f GB in float32, %.1f GB are available: reading it one layer at a time", model_name, needed / 1e9, available / 1e9)
        return OnloadSettings()
    return None


def _quantize_onloaded_job(
    model_name, recipe, config, evaluation, calibration, pipeline, seed, evaluate_fp, progress, save_to, onload, start
) -> dict:
    """`quantize_job` reading one decoder layer at a time (`lowbit.streaming`)."""
    from transformers import AutoTokenizer

    folder = resolve_model(model_name)
    if not Path(folder).is_dir():
        raise UserError(
            f"layer-by-layer onloading reads a local model folder; {model_name!r} is a hub id: download it first (huggingface-cli download)"
        )
    if calibration.data == GENERATED:
        raise UserError("--calib generated needs the whole model to write text; with layer-by-layer onloading calibrate on a text or dataset")
    checkpoint = Checkpoint(folder)  # a missing or unreadable shard fails here, before anything else
    algorithm = get_algorithm(recipe.algorithm)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    data_name = evaluation.data or DEFAULT_DATA
    log.info("tokenizing evaluation text %s", data_name)
    eval_ids = tokenize(tokenizer, load_text(evaluation.data, split="eval"))
    release_freed_memory()
    needs_calib = recipe.scheme.needs_calibration or recipe.transform.needs_calibration or algorithm.calibrated
    windows = eval_windows(eval_ids, evaluation.seq_len, evaluation.windows).shape[0]
    streams = (2 if evaluate_fp else 1) * windows * evaluation.seq_len
    if needs_calib:
        streams += (2 if recipe.transform.needs_calibration else 1) * calibration.samples * calibration.seq_len
    check_offload_space(onload, activation_bytes(config, 1, streams))
    del checkpoint
    report = recipe_report(model_name, recipe)
    batches = None
    if needs_calib:
        t0 = time.time()
        log.info("calibration text %s: %d samples x %d tokens", calibration.data or DEFAULT_DATA, calibration.samples, calibration.seq_len)
        batches = calibration_batches(tokenizer, calibration.data, calibration.samples, calibration.seq_len, seed)
        report["calibration"] = {
            "data": calibration.data or DEFAULT_DATA,
            "samples": calibration.samples,
            "seq_len": calibration.seq_len,
            "seconds": time.time() - t0,
        }
        if algorithm.calibrated:
            report["calibration"]["dtype"] = pipeline.dtype
    log.info("quantizing to %s with %s, one decoder layer at a time from %s", recipe.scheme.name, recipe.algorithm, folder)
    result = quantize_onloaded(
        folder,
        recipe.scheme,
        recipe.transform,
        recipe.algorithm_config,
        batches,
        eval_ids,
        seq_len=evaluation.seq_len,
        windows=evaluation.windows,
        evaluate_fp=evaluate_fp,
        pipeline=pipeline,
        settings=onload,
        save_to=save_to,
        tokenizer=tokenizer,
        source_name=model_name,
        progress=progress,
    )
    if result.fp is not None:
        report["fp"] = {"ppl": result.fp.ppl, **cost_summary(build_skeleton(folder), None, evaluation.seq_len)}
    q = result.quantized
    report["eval"] = {"data": data_name, "windows": q.windows, "seq_len": evaluation.seq_len, "tokens": q.tokens}
    report["quantized"] = {"ppl": q.ppl, **cost_summary(result.model, recipe.scheme, evaluation.seq_len), "quantize_seconds": result.quantize_seconds}
    state = quantization_state(result.model)
    report["transform_args"] = state.transform
    if state.algorithm_config:
        report["algorithm_args"] = state.algorithm_config
    if result.layer_errors:
        report["layer_errors"] = result.layer_errors
    report["onload"] = {"max_memory": onload.max_memory, "offloaded_activation_bytes": result.offloaded_bytes}
    if save_to is not None:
        report["saved_model"] = {"path": RUN_SUBDIR, "bytes_on_disk": sum(f.stat().st_size for f in Path(save_to).iterdir())}
    report["seconds"] = time.time() - start
    report["peak_rss_bytes"] = peak_rss_bytes()
    return report


COST_SCHEMES = ("W8A8KV8", "W4A16", "W4A8KV4", "W4A4KV4")  # the comparison table of `lowbit evaluate`


def evaluate_job(
    model_name: str,
    *,
    evaluation: EvalSettings = EvalSettings(),
    scheme: Scheme | None = None,
    int_kernels: bool = False,
    harness: HarnessConfig | None = None,
    cost_schemes: tuple[str, ...] | None = COST_SCHEMES,
    evaluate_ppl: bool = True,
    progress: bool = True,
    dtype: str = "float32",
    onload: OnloadSettings | None = None,
) -> dict:
    """Perplexity, zero-/few-shot tasks and costs of a model, optionally RTN-quantized in memory
    (`scheme`) and run on integer kernels (`int_kernels`), computed in `dtype` (as an engine serving
    an export in that dtype: `cast_model`). Costs of other schemes (`cost_schemes`) are computed
    from the unquantized model, without quantizing it. With `onload` (or when the model in float32
    would not fit in memory) the perplexity of a model folder is computed one decoder layer at a time."""
    start = time.time()
    data, windows, seq_len = evaluation.data, evaluation.windows, evaluation.seq_len
    if harness is not None:
        offline_tasks.check_available(harness.tasks)  # before any model loads: the data wheel of the offline tasks is there
    saved = saved_model_dir(model_name)  # a `lowbit quantize --out` folder, or its model/ folder
    if saved is None:
        onload = _choose_onload(model_name, onload)
        if onload is not None:
            if scheme is not None or int_kernels or harness is not None or dtype != "float32" or not evaluate_ppl:
                raise UserError(
                    "layer-by-layer onloading measures a model folder's perplexity in float32; --scheme, --int-kernels, --tasks and --dtype "
                    "need the model in memory (--no-onload), and quantizing it is `lowbit quantize --onload`"
                )
            return _evaluate_onloaded_job(model_name, evaluation, cost_schemes, onload, progress, start)
    elif onload is not None:
        raise UserError(f"{model_name} is a saved quantized model, which loads whole (it is a fraction of its float size); drop --onload")
    if int_kernels and scheme is None and saved is None:
        raise UserError("--int-kernels runs quantized layers on integer kernels; give a --scheme (e.g. W8A8 or W4A16)")
    if int_kernels and scheme is not None:
        check_integer_formats(scheme)
    if saved is not None:
        if scheme is not None:
            raise UserError(f"{model_name} holds a saved quantized model already; drop --scheme")
        model, tokenizer = load_quantized(saved)
        if tokenizer is None:
            raise UserError(f"{saved} was saved without a tokenizer; save it again with one to evaluate it")
    else:
        config = load_config(model_name)  # before the weights load
        check_window(config, seq_len)
        if scheme is not None:
            check_scheme_for_config(config, scheme)
        model, tokenizer = load_model(model_name)
    check_window(model.config, seq_len)
    spec = get_arch(model)
    if scheme is not None:
        check_scheme(model, spec, scheme)
        if scheme.needs_calibration:
            raise UserError(f"{scheme.name} has static quantizers that need calibration; use lowbit quantize for it")
    tasks = load_tasks(harness) if harness is not None else None  # unknown task, unreachable dataset: fail early
    report: dict = {"lowbit_version": __version__, "model": model_name}
    if cost_schemes is not None and saved is None:  # the table is computed from the unquantized model
        names = [None, *cost_schemes] + ([scheme.name] if scheme is not None and scheme.name not in cost_schemes else [])
        report["cost_table"] = [scheme_cost(model, name, seq_len) for name in names]
    part = "fp"
    if saved is not None:
        state = quantization_state(model)
        scheme = state.scheme
        report.update(scheme=scheme.name, scheme_args=scheme.to_dict(), formats=scheme.formats(), transform=state.transform.get("kind", "none"))
        part = "quantized"
    elif scheme is not None:
        log.info("quantizing to %s (RTN, in memory)", scheme.name)
        model = quantize(model, scheme, inplace=True, progress=progress)
        report.update(scheme=scheme.name, scheme_args=scheme.to_dict(), formats=scheme.formats(), transform="none", algorithm="rtn")
        part = "quantized"
    if int_kernels:
        model = convert_to_int_kernels(model, inplace=True)
        report["kernels"] = "int"
    if dtype != "float32":
        cast_model(model, export_dtype(dtype))
        report["dtype"] = dtype
    report[part] = cost_summary(model, scheme, seq_len)
    if evaluate_ppl:
        eval_ids = tokenize(tokenizer, load_text(data, split="eval"))
        release_freed_memory()  # the tokenizer's temporaries for a whole text are large
        result = perplexity(model, eval_ids, seq_len, windows, progress=progress, desc="perplexity")
        report["eval"] = {"data": data or DEFAULT_DATA, "windows": result.windows, "seq_len": seq_len, "tokens": result.tokens}
        report[part] = {"ppl": result.ppl, **report[part]}
    if harness is not None:
        report["tasks"] = evaluate_tasks(model, tokenizer, harness, progress=progress, loaded=tasks)
    report["seconds"] = time.time() - start
    report["peak_rss_bytes"] = peak_rss_bytes()
    return report


def _evaluate_onloaded_job(model_name, evaluation, cost_schemes, onload, progress, start) -> dict:
    """`evaluate_job`'s perplexity of a model folder read one decoder layer at a time."""
    from transformers import AutoTokenizer

    folder = resolve_model(model_name)
    if not Path(folder).is_dir():
        raise UserError(
            f"layer-by-layer onloading reads a local model folder; {model_name!r} is a hub id: download it first (huggingface-cli download)"
        )
    config = load_config(model_name)
    check_window(config, evaluation.seq_len)
    Checkpoint(folder)  # a missing or unreadable shard fails here
    tokenizer = AutoTokenizer.from_pretrained(folder)
    eval_ids = tokenize(tokenizer, load_text(evaluation.data, split="eval"))
    release_freed_memory()
    windows = eval_windows(eval_ids, evaluation.seq_len, evaluation.windows).shape[0]
    check_offload_space(onload, activation_bytes(config, windows, evaluation.seq_len))
    skeleton = build_skeleton(folder)
    report: dict = {"lowbit_version": __version__, "model": model_name}
    if cost_schemes is not None:
        report["cost_table"] = [scheme_cost(skeleton, name, evaluation.seq_len) for name in [None, *cost_schemes]]
    result = perplexity_onloaded(folder, eval_ids, evaluation.seq_len, evaluation.windows, onload, progress)
    report["eval"] = {"data": evaluation.data or DEFAULT_DATA, "windows": result.windows, "seq_len": evaluation.seq_len, "tokens": result.tokens}
    report["fp"] = {"ppl": result.ppl, **cost_summary(skeleton, None, evaluation.seq_len)}
    report["onload"] = {"max_memory": onload.max_memory}
    report["seconds"] = time.time() - start
    report["peak_rss_bytes"] = peak_rss_bytes()
    return report


def info_job(model_name: str, scheme: Scheme | None = None) -> dict:
    model, _ = load_model(model_name)
    spec = get_arch(model)
    c = model.config
    layers = decoder_layers(model, spec)
    # linear paths per layer, every expert's written once as experts.{0..E-1}
    expert = re.compile(re.escape(spec.moe.experts + ".") + r"\d+\.") if spec.moe else None
    by_layer = [
        list(dict.fromkeys(expert.sub(spec.moe.experts + ".{e}.", n) if expert else n for n in layer_linear_names(layer, spec))) for layer in layers
    ]
    linears = list(dict.fromkeys(n for names in by_layer for n in names))
    params = sum(p.numel() for p in {p.data_ptr(): p for p in model.parameters()}.values())
    info = {
        "model": model_name,
        "family": spec.family,
        "model_type": c.model_type,
        "layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "attention_heads": c.num_attention_heads,
        "kv_heads": getattr(c, "num_key_value_heads", c.num_attention_heads),
        "head_dim": head_dim(c),
        "vocab_size": c.vocab_size,
        "tied_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
        "parameters": params,
        "linears_per_layer": linears,
    }
    moe_layers = [i for i, layer in enumerate(layers) if is_moe_layer(layer, spec)]
    if moe_layers:
        n = expert_dims(get_module(layers[moe_layers[0]], spec.moe.experts), spec.moe)[0]
        info["linears_per_layer"] = [name.replace("{e}", f"{{0..{n - 1}}}") for name in linears]
        info["moe"] = {
            "experts": n,
            "experts_per_token": getattr(c, spec.moe.top_k),
            "moe_layers": moe_layers,
            "router": spec.moe.router,
            "shared_expert": spec.moe.shared_expert,
        }
    if scheme is not None:
        touched = []
        if scheme.weights or scheme.inputs:
            for name, shown in zip(linears, info["linears_per_layer"]):
                where = [i for i, names in enumerate(by_layer) if name in names]
                span = f"{{0..{len(layers) - 1}}}" if len(where) == len(layers) else "{" + ",".join(map(str, where)) + "}"
                touched.append(f"{spec.layers}.{span}.{shown}")
        if scheme.quantize_lm_head:
            touched.append(spec.lm_head)
        info["scheme"] = scheme.name
        info["formats"] = scheme.formats()
        info["quantized_linears"] = touched
        info["quantized_linear_count"] = sum(len(layer_linear_names(layer, spec)) for layer in layers) if touched else 0
        info["kv_quantized"] = bool(scheme.keys or scheme.values)
        info.update(cost_summary(quantize(model, scheme, progress=False), scheme, 2048) if not scheme.needs_calibration else {})
    return info


def generate_data_job(model_name: str, out: str, config, *, progress: bool = True) -> dict:
    """`lowbit generate-data`: sharded, resumable data-free generation (LLM-QAT)."""
    from .qat import generate_dataset

    start = time.time()
    torch.manual_seed(config.seed)
    log.info("loading %s", model_name)
    model, tokenizer = load_model(model_name)
    get_arch(model)
    log.info("generating %d sequences of up to %d tokens (%s) into %s", config.samples, config.max_length, config.sampling.strategy, out)
    stats = generate_dataset(model, tokenizer, out, config, progress=progress)
    return {
        "lowbit_version": __version__,
        "model": model_name,
        "data": str(out),
        "generation": config.to_dict(),
        "stats": stats,
        "seconds": time.time() - start,
    }


def qat_job(
    model_name: str,
    recipe: Recipe,
    data_dir: str,
    config,
    *,
    checkpoint_dir: str | None = None,
    evaluation: EvalSettings = EvalSettings(),
    calib_samples: int = 128,
    evaluate_fp: bool = True,
    progress: bool = True,
    save_to: str | Path | None = None,
) -> dict:
    """`lowbit qat`: quantize (the PTQ starting point), distil on generated data, evaluate before and after;
    with `save_to`, rank 0 saves the trained (frozen) student there in lowbit's native format.

    Calibration, where the recipe needs it, uses the generated data too (data-free throughout).
    Under torchrun every rank trains; rank 0 evaluates and returns the report (others return {})."""
    from .qat import freeze_student, load_dataset, train
    from .qat.datagen import dataset_stats, generated_calibration
    from .qat.train import gather_weights, learn_weight_scales

    start = time.time()
    data, windows, seq_len = evaluation.data, evaluation.windows, evaluation.seq_len
    device = init_distributed()
    main = rank() == 0
    torch.manual_seed(config.seed)
    dataset = load_dataset(data_dir)  # fails early on a missing or incomplete folder
    check_window(load_config(model_name), seq_len)
    log.info("loading %s", model_name)
    teacher, tokenizer = load_model(model_name, device=str(device))
    spec = get_arch(teacher)
    check_scheme(teacher, spec, recipe.scheme)
    check_transform(teacher, spec, recipe.transform)
    config.check(world_size())
    eval_ids = tokenize(tokenizer, load_text(data, split="eval")) if main else None
    report = recipe_report(model_name, recipe)
    if evaluate_fp and main:
        log.info("evaluating full precision")
        fp = perplexity(teacher, eval_ids, seq_len, windows, progress=progress, desc="perplexity FP")
        report["fp"] = {"ppl": fp.ppl, **cost_summary(teacher, None, seq_len)}
    calibration = None
    needs_calib = recipe.scheme.needs_calibration or recipe.transform.needs_calibration or get_algorithm(recipe.algorithm).calibrated
    if needs_calib:
        calibration = generated_calibration(dataset, calib_samples, config.max_seq_len)
        report["calibration"] = {"data": str(data_dir), "samples": len(calibration), "seq_len": calibration[0].shape[-1]}
    log.info("building the student: %s, transform %s, %s", recipe.scheme.name, recipe.transform.kind, recipe.algorithm)
    student = quantize(teacher, recipe, calibration=calibration, trainable=True, progress=progress)
    if main:
        log.info("evaluating the starting point (before QAT)")
        before = perplexity(student, eval_ids, seq_len, windows, progress=progress, desc="perplexity before QAT")
        report["ptq"] = {"ppl": before.ppl}
    log.info("QAT: %d steps x %d sequences on %d generated sequences", config.steps, config.batch_size, len(dataset))
    sharded = config.fsdp and world_size() > 1
    if config.learn_scales:  # before the copy, so that it has the same parameters to load into
        learn_weight_scales(student)
    whole = copy.deepcopy(student) if sharded and main else None  # FSDP shards the student in place
    summary = train(student, teacher, dataset, config, checkpoint_dir=checkpoint_dir, progress=progress)
    if sharded:  # every rank gathers; rank 0 evaluates and saves the whole trained student
        trained = gather_weights({n: p for n, p in student.named_parameters() if p.requires_grad})
        student = whole
        if main:  # only the trained parameters come back: every one of them must land
            unexpected = student.load_state_dict(trained, strict=False).unexpected_keys
            if unexpected:
                raise RuntimeError(f"trained parameters with no place in the unsharded student: {unexpected[:3]}")
    if not main:
        return {}
    freeze_student(student)
    del teacher
    log.info("evaluating after QAT")
    after = perplexity(student, eval_ids, seq_len, windows, progress=progress, desc="perplexity after QAT")
    report["eval"] = {"data": data or DEFAULT_DATA, "windows": after.windows, "seq_len": seq_len, "tokens": after.tokens}
    report["quantized"] = {"ppl": after.ppl, **cost_summary(student, recipe.scheme, seq_len)}
    report["transform_args"] = quantization_state(student).transform
    history = summary["history"]
    report["qat"] = {
        "config": asdict(config),
        "processes": world_size(),
        "data": str(data_dir),
        "data_stats": dataset_stats(dataset),
        "seconds": summary["seconds"],
        "steps": summary["steps"],
        "tokens_this_run": summary["tokens_this_run"],
        "first_loss": history[0]["loss"] if history else None,
        "last_loss": history[-1]["loss"] if history else None,
        "loss_history": [round(h["loss"], 5) for h in history],
    }
    if save_to is not None:
        report["saved_model"] = save_model(student, save_to, tokenizer)
    report["seconds"] = time.time() - start
    report["peak_rss_bytes"] = peak_rss_bytes()
    return report
