"""Run reports: `report.json` (machine-readable, the report contract) and `report.md`, written atomically."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from .files import check_out_dir, staging_dir, write_dir_atomically
from .io.native import RUN_SUBDIR

log = logging.getLogger("lowbit")


def write_run_dir(out: str | Path, files: dict[str, str], dirs: dict[str, Path] | None = None, *, overwrite: bool = True) -> Path:
    """Write `files` (name -> text) into a fresh folder, move the finished folders `dirs`
    (name -> a folder already written on the same filesystem) into it, and move it to `out` in
    one rename."""

    def fill(tmp: Path) -> None:
        for name, text in files.items():
            (tmp / name).write_text(text)
        for name, folder in (dirs or {}).items():
            os.replace(folder, tmp / name)

    return write_dir_atomically(out, fill, overwrite=overwrite)


class RunOutput:
    """The output folder of one run (`--out`): refused up front if it exists (unless overwriting),
    written in one rename at the end with the reports and, if asked, the saved model, which is
    first written to a staging folder beside it. Use as a context manager; without `out` nothing
    is written. The staging folder is removed however the run ends."""

    def __init__(self, out: str | Path | None, overwrite: bool = False, save_model: bool = True, inputs: tuple = ()) -> None:
        self.out, self.overwrite, self.inputs = (Path(out) if out else None), overwrite, inputs
        self._stage = staging_dir(self.out) if self.out is not None and save_model else None
        self.staging: Path | None = None

    def __enter__(self) -> RunOutput:
        if self.out is not None:
            check_out_dir(self.out, self.overwrite, self.inputs)
        if self._stage is not None:
            self.staging = self._stage.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._stage is not None:
            self._stage.__exit__(*exc)

    @property
    def model_dir(self) -> Path | None:
        """Where the run saves its model (None: not saved)."""
        return self.staging / RUN_SUBDIR if self.staging is not None else None

    def finish(self, report: dict) -> None:
        if self.out is None:
            return
        saved = self.model_dir is not None and self.model_dir.is_dir()
        write_run_dir(self.out, report_files(report), {RUN_SUBDIR: self.model_dir} if saved else None, overwrite=self.overwrite)
        log.info("wrote %s/report.json and report.md%s", self.out, f" and the model in {self.out}/{RUN_SUBDIR}" if saved else "")


def report_files(report: dict) -> dict[str, str]:
    return {"report.json": json.dumps(report, indent=2) + "\n", "report.md": report_markdown(report)}


def _gb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:.3f} GB"


def _gops(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e12:.2f} T"


def report_markdown(report: dict) -> str:
    ev = report.get("eval", {})
    fp, q = report.get("fp", {}), report.get("quantized", {})
    lines = [
        f"# lowbit report: {report.get('model')} {report.get('scheme', '')}".rstrip(),
        "",
        f"- transform: {report.get('transform', 'none')}, algorithm: {report.get('algorithm', '-')}",
    ]
    formats = report.get("formats")
    if formats:
        described = ", ".join(f"{kind} {f['format']} ({f['bits_per_value']:g} bits/value)" for kind, f in formats.items())
        lines.append(f"- formats: {described}")
    bits = q.get("bits_per_weight")
    if bits is not None:
        lines.append(f"- quantized linears take {bits:.3f} bits per weight at rest (codes and scales)")
    if report.get("kernels") == "int":
        lines.append("- linears run on integer kernels (int8 x int8 with int32 accumulation, or packed int4)")
    if ev:
        lines.append(
            f"- evaluation: {ev.get('data')}, {ev.get('windows')} windows x {ev.get('seq_len')} tokens "
            f"({ev.get('tokens')} predicted tokens), token-level perplexity"
        )
    lines += ["", "| | perplexity | size | OPs (per sequence) |", "|---|---|---|---|"]
    ptq = report.get("ptq", {})  # QAT runs: the quantized starting point, before training
    for label, part in (("full precision", fp), ("quantized, before QAT", ptq), ("quantized" + (", after QAT" if ptq else ""), q)):
        if part:
            ppl = part.get("ppl")
            lines.append(f"| {label} | {'-' if ppl is None else f'{ppl:.3f}'} | {_gb(part.get('size_bytes'))} | {_gops(part.get('ops'))} |")
    kv = q.get("kv_cache_bytes") or fp.get("kv_cache_bytes")
    if kv:
        lines += ["", "KV cache per sequence: " + ", ".join(f"{ctx} tokens: {n / 1e6:.1f} MB" for ctx, n in kv.items())]
    if report.get("tasks"):
        lines += ["", *task_table(report["tasks"])]
    if report.get("cost_table"):
        lines += ["", *cost_table(report["cost_table"])]
    cal = report.get("calibration")
    if cal:
        lines += ["", f"Calibration: {cal['data']}, {cal['samples']} x {cal['seq_len']} tokens."]
    qat = report.get("qat")
    if qat:
        c = qat["config"]
        lines += [
            "",
            f"QAT: {qat['steps']} steps x {c['batch_size']} sequences (<= {c['max_seq_len']} tokens) of {qat['data']}, "
            f"losses {c['losses']}, lr {c['lr']} ({c['schedule']}), {qat['processes']} process(es), {qat['seconds']:.1f} s; "
            f"loss {qat['first_loss']:.4f} -> {qat['last_loss']:.4f}.",
        ]
    if "quantize_seconds" in q:
        lines += ["", f"Quantization took {q['quantize_seconds']:.1f} s."]
    choices = (report.get("transform_args") or {}).get("choices")
    if choices:
        lines += ["", *choice_table(choices)]
    errors = report.get("layer_errors")
    if errors:
        lines += ["", *layer_error_table(errors, report.get("algorithm", ""))]
    lines += [
        "",
        "Size counts quantized weights packed at their bit width plus their scales in the scale format, other tensors at 16 bits. "
        "OPs = MACs x W_bits x A_bits (LLM-QAT), linears incl. lm_head plus attention matmuls at 16 x KV bits"
        + (
            f"; the first {report['scheme_args']['fp_prefix']} tokens (P<N>) at 16-bit activations, keys and values, in OPs and KV cache."
            if (report.get("scheme_args") or {}).get("fp_prefix")
            else "."
        ),
        "",
        f"Wall time: {report.get('seconds', 0):.1f} s, peak resident memory {_gb(report.get('peak_rss_bytes'))} "
        f"(lowbit {report.get('lowbit_version')})",
        "",
    ]
    return "\n".join(lines)


def choice_table(choices: dict[str, dict]) -> list[str]:
    """Markdown rows: transform 'auto''s choice (and alpha) per layer and input group."""
    layers: dict[str, dict[str, str]] = {}
    for key, c in choices.items():
        layer, role = key.split(".", 1)
        layers.setdefault(layer, {})[role] = c["choice"] + (f" {c['alpha']:g}" if c.get("alpha") is not None else "")
    roles = list(dict.fromkeys(role for entry in layers.values() for role in entry))
    lines = ["Transform chosen per input group (smoothing alpha), by quantized output error on the calibration rows:", ""]
    lines += ["| layer | " + " | ".join(roles) + " |", "|---|" + "---|" * len(roles)]
    lines += [f"| {layer} | " + " | ".join(entry.get(r, "-") for r in roles) + " |" for layer, entry in layers.items()]
    return lines


def layer_error_table(errors: list[dict], algorithm: str) -> list[str]:
    """Markdown rows: relative output error per layer and input group, the algorithm's beside RTN's."""
    groups = list(dict.fromkeys(k for entry in errors for k in entry if k != "layer"))  # MoE models may mix layer kinds
    lines = [
        f"Relative output error on the calibration inputs, ||X dW||^2 / ||X W||^2, {algorithm} (RTN):",
        "",
        "| layer | " + " | ".join(groups) + " |",
        "|---|" + "---|" * len(groups),
    ]
    for entry in errors:
        cells = [f"{entry[g].get(algorithm, 0):.2e} ({entry[g].get('rtn', 0):.2e})" + _fallback_note(entry[g]) if g in entry else "-" for g in groups]
        lines.append(f"| {entry['layer']} | " + " | ".join(cells) + " |")
    return lines


def _fallback_note(group: dict) -> str:
    """For an MoE layer's experts: which fell back to RTN (too few routed calibration tokens)."""
    fallback = group.get("experts", {}).get("rtn_fallback")
    return f" experts {fallback} RTN" if fallback else ""


def _metric(entry: dict, name: str) -> str:
    if name not in entry:
        return "-"
    stderr = entry.get(f"{name}_stderr")
    return f"{entry[name]:.4f}" + (f" ± {stderr:.4f}" if isinstance(stderr, float) and not math.isnan(stderr) else "")


def task_table(tasks: dict) -> list[str]:
    """Markdown rows: acc and acc_norm (and exact_match) of each lm-eval task, with standard errors."""
    limit = f", first {tasks['limit']} examples per task" if tasks.get("limit") else ""
    lines = [
        f"Tasks (lm-evaluation-harness {tasks.get('lm_eval_version')}{limit}):",
        "",
        "| task | shots | samples | acc | acc_norm | exact_match |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in tasks["results"].items():
        lines.append(
            f"| {name} | {entry.get('num_fewshot', '-')} | {entry.get('samples', '-')} | {_metric(entry, 'acc')} | "
            f"{_metric(entry, 'acc_norm')} | {_metric(entry, 'exact_match')} |"
        )
    notes = tasks.get("notes") or {}
    if notes:  # how an offline task differs from the lm-eval task it reproduces
        lines += ["", *(f"- {name}: {note}" for name, note in notes.items())]
    return lines


def cost_table(rows: list[dict]) -> list[str]:
    """Markdown rows: size, OPs and KV-cache memory per scheme (computed, not measured)."""
    contexts = list(rows[0]["kv_cache_bytes"])
    lines = [
        f"Cost per scheme (OPs for one sequence of {rows[0]['ops_seq_len']} tokens; KV cache per sequence):",
        "",
        "| scheme | size | OPs | " + " | ".join(f"KV {int(c) // 1024}k" for c in contexts) + " |",
        "|---|---|---|" + "---|" * len(contexts),
    ]
    for row in rows:
        kv = " | ".join(f"{row['kv_cache_bytes'][c] / 1e6:.1f} MB" for c in contexts)
        lines.append(f"| {row['scheme']} | {_gb(row['size_bytes'])} | {_gops(row['ops'])} | {kv} |")
    return lines
