"""Seed 003's study on the default model: `lowbit analyze` with its default settings, timed.

Runs exactly `lowbit analyze --out benchmarks/results/analysis_smollm2 --overwrite` in a child
process (so the wall time and peak RSS are those of the command a user runs, model loading
included), then prints the findings and the per-role table from the analysis.json it wrote and
records the timing in benchmarks/results/analysis_smollm2/timing.json. A README.md already in
that folder is put back after the run.

    python benchmarks/analysis_smollm2.py                 # default: enwiki-sample, 512 tokens
    python benchmarks/analysis_smollm2.py --name analysis_smollm2_wikitext2 -- --data wiki.test.raw
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="analysis_smollm2")
    parser.add_argument("extra", nargs="*", help="extra `lowbit analyze` options (after --)")
    args = parser.parse_args()
    out = ROOT / "results" / args.name
    cmd = [sys.executable, "-m", "lowbit.cli", "analyze", "--out", str(out), "--overwrite", *args.extra]
    # the folder's hand-written README (the reading of the results) survives the --overwrite
    readme = (out / "README.md").read_text() if (out / "README.md").is_file() else None
    load_before = os.getloadavg()
    start = time.time()
    subprocess.run(cmd, check=True)
    seconds = time.time() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = usage.ru_maxrss * 1024
    result = json.loads((out / "analysis.json").read_text())
    timing = {
        "command": "lowbit analyze --out benchmarks/results/" + args.name + " --overwrite " + " ".join(args.extra),
        "wall_seconds": seconds,
        "analysis_seconds": result["seconds"],
        "peak_rss_bytes": peak,
        # CPU time does not depend on how busy the machine is: on 2 otherwise idle cores the wall
        # time is at most about this (the work is at most 2-way parallel, never worse than serial)
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
    }
    (out / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    if readme is not None:
        (out / "README.md").write_text(readme)
    print("\n".join(result["recommendation"]))
    corr = result["correlation_error_vs_difficulty_sq"]["none"]
    print(
        f"error vs difficulty^2: r = {corr['all']:.3f} (all {corr['points']}), {corr['without_set_aside']:.3f} "
        f"({corr['points_kept']} kept; set aside {', '.join(a['site'] for a in result['set_aside'])})"
    )
    print("| role | " + " | ".join(result["transforms"]) + " |")
    for role, r in result["by_role"].items():
        print(f"| {role} | " + " | ".join(f"{r['total_error'][k]:.3g}" for k in result["transforms"]) + " |")
    print(
        f"wall time {seconds:.1f} s, CPU time {timing['cpu_seconds']:.1f} s, peak RSS {peak / 1e9:.2f} GB, "
        f"load average before {load_before[0]:.1f} on {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
