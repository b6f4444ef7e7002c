"""What the engine scripts share: their command line and how they write results. Imported by
scripts that run in the engines' own environments, so it imports nothing from lowbit."""

import argparse
import json
import sys


def parse_args(doc: str, extra=None) -> argparse.Namespace:
    """MODEL TOKENS.json OUT.json [--generate N] [--prompt N], plus the engine's own options."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("tokens")
    parser.add_argument("out")
    parser.add_argument("--generate", type=int, default=32, help="greedy tokens after each window's prompt")
    parser.add_argument("--prompt", type=int, default=64, help="prompt length of the greedy continuation")
    if extra is not None:
        extra(parser)
    return parser.parse_args()


def read_windows(path: str) -> list[list[int]]:
    with open(path) as f:
        return json.load(f)["windows"]


def error_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def write_result(result: dict, out: str) -> None:
    with open(out, "w") as f:
        json.dump(result, f)
    print(json.dumps({k: v for k, v in result.items() if k not in ("prompt_logprobs", "greedy")}), file=sys.stderr)
