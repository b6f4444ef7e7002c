"""Write what every runner reads, once: the model as a float32 safetensors folder with its
tokenizer, the evaluation windows and the calibration windows as token ids.

Run in lowbit's environment (it uses lowbit's loaders and text splits); the files it writes are
plain safetensors and JSON, so the other tools' runners read them without lowbit.

    python benchmarks/compare/prepare.py --out benchmarks/.cache/compare-w10-c128x512 --windows 10
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

WIKITEXT2 = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def prepare(out: Path, model_name: str, eval_text: str, windows: int, seq_len: int, calib_samples: int, calib_seq_len: int) -> dict:
    import lowbit
    from lowbit.data import calibration_batches, load_text, tokenize
    from lowbit.evaluation.perplexity import eval_windows

    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = lowbit.load_model(model_name)
    model_dir = out / "model"
    if not model_dir.is_dir():
        partial_dir = out / ".model.partial"
        shutil.rmtree(partial_dir, ignore_errors=True)
        model.save_pretrained(partial_dir, safe_serialization=True)
        tokenizer.save_pretrained(partial_dir)
        partial_dir.rename(model_dir)  # whole or absent: an interrupted run saves it again
    eval_ids = eval_windows(tokenize(tokenizer, load_text(eval_text)), seq_len, windows).contiguous()
    if eval_ids.shape[0] < windows:
        raise SystemExit(f"{eval_text} has only {eval_ids.shape[0]} windows of {seq_len} tokens")
    # the calibration half of lowbit's default corpus: never the evaluation text
    calib_ids = torch.cat(calibration_batches(tokenizer, None, calib_samples, calib_seq_len, seed=0)).contiguous()
    for name, ids in (("eval_ids.safetensors", eval_ids), ("calib_ids.safetensors", calib_ids)):
        partial = out / f".{name}.partial"
        save_file({"input_ids": ids}, str(partial))
        partial.replace(out / name)  # a reader never sees a half-written file
    manifest = {
        "model": model_name,
        "eval_text": str(eval_text),
        "eval_windows": int(eval_ids.shape[0]),
        "seq_len": seq_len,
        "calib_text": "enwiki-sample (calibration half), random non-overlapping windows, seed 0",
        "calib_samples": calib_samples,
        "calib_seq_len": calib_seq_len,
        "sha256": {name: file_sha256(out / name) for name in ("eval_ids.safetensors", "calib_ids.safetensors")},
    }
    partial = out / ".manifest.json.partial"
    partial.write_text(json.dumps(manifest, indent=2) + "\n")
    partial.replace(out / "manifest.json")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--eval-text", default=str(WIKITEXT2))
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    args = parser.parse_args()
    manifest = prepare(args.out, args.model, args.eval_text, args.windows, args.seq_len, args.calib_samples, args.calib_seq_len)
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
