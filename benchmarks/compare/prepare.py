"""Write what every runner reads, once: the model as a float32 safetensors folder with its
tokenizer, the evaluation windows and the calibration windows as token ids.

Run in lowbit's environment (it uses lowbit's loaders and text splits); the files it writes are
plain safetensors and JSON, so the other tools' runners read them without lowbit.

    python benchmarks/compare/prepare.py --out benchmarks/.cache/compare --windows 10
"""

from __future__ import annotations

import argparse
import hashlib
import json
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
    if not (model_dir / "config.json").is_file():
        model.save_pretrained(model_dir, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)
    eval_ids = eval_windows(tokenize(tokenizer, load_text(eval_text)), seq_len, windows).contiguous()
    if eval_ids.shape[0] < windows:
        raise SystemExit(f"{eval_text} has only {eval_ids.shape[0]} windows of {seq_len} tokens")
    # the calibration half of lowbit's default corpus: never the evaluation text
    calib_ids = torch.cat(calibration_batches(tokenizer, None, calib_samples, calib_seq_len, seed=0)).contiguous()
    save_file({"input_ids": eval_ids}, str(out / "eval_ids.safetensors"))
    save_file({"input_ids": calib_ids}, str(out / "calib_ids.safetensors"))
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
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
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
