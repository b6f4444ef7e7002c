#!/usr/bin/env bash
# The same PTQ rows measured by the code before the core redesign (commit 4ecc974, where every
# algorithm returned float weights and codes were searched back) and by this tree: same model,
# same first 5 WikiText-2 windows of 2048 tokens, same 32 x 512 calibration windows of the
# enwiki-sample calibration half (seed 0), one row after the other on a quiet machine.
#   bash benchmarks/redesign_check.sh   -> results/before_redesign.{jsonl,json,md}, results/after_redesign.{jsonl,json,md}
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROWS=W4A16/none/rtn,W4g64A16/none/gptq,W4A16/none/awq,W4A8KV4/rotate/rtn,W8A8/smooth/rtn
WORK=$(mktemp -d)
trap 'git -C "$ROOT" worktree remove --force "$WORK/tree" 2>/dev/null || true; rm -rf "$WORK"' EXIT
git -C "$ROOT" worktree add -q --detach "$WORK/tree" 4ecc974
ln -s "$ROOT/../shared" "$WORK/shared"  # the old script reads the evaluation text beside its tree
(cd "$WORK/tree" && PYTHONPATH="$WORK/tree/src" python benchmarks/ptq_table.py --name before_redesign --windows 5 --calib-samples 32 --rows "$ROWS")
cp "$WORK/tree/benchmarks/results/before_redesign".* "$ROOT/benchmarks/results/"
python "$ROOT/benchmarks/ptq_table.py" --name after_redesign --windows 5 --calib-samples 32 --rows "$ROWS"
