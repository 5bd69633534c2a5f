#!/usr/bin/env python
"""Time `snakemake -n` of the paper-scale DAG (1024 tokenize shards, 5 strategies x 10 seeds,
4 context lengths: 1,098 jobs). Goal: under 10 s.

Runs in an empty scratch folder that links to this checkout's workflow/, config/ and profiles/,
so that results already on disk do not shrink the DAG.

    python scripts/bench_dryrun.py [--repeat 3] [--configfile config/workflow-paper.yaml] [--max-s 10]
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def scratch_project(tmp: Path) -> Path:
    for name in ("workflow", "config", "profiles"):
        (tmp / name).symlink_to(ROOT / name)
    return tmp


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry-run."""
    block = output.split("Job stats:", 1)[1]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", block, flags=re.M)}


def dry_run(workdir: Path, configfile: str, extra: list[str]) -> tuple[float, dict[str, int]]:
    start = time.perf_counter()
    out = subprocess.run(["snakemake", "-n", "--configfile", str(ROOT / configfile), *extra],
                         cwd=workdir, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"snakemake -n failed:\n{out.stderr[-3000:]}")
    return elapsed, job_counts(out.stdout + out.stderr)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configfile", default="config/workflow-paper.yaml")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--max-s", type=float, default=10.0, help="exit 1 when the median exceeds this")
    args, extra = p.parse_known_args()
    with tempfile.TemporaryDirectory(prefix="masep-bench-") as tmp:
        workdir = scratch_project(Path(tmp))
        times = []
        for i in range(args.repeat):
            elapsed, counts = dry_run(workdir, args.configfile, extra)
            times.append(elapsed)
            print(f"run {i + 1}: {elapsed:.2f} s, {counts.get('total', 0)} jobs", flush=True)
    median = statistics.median(times)
    jobs = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "total")
    print(f"snakemake -n of {args.configfile}: {counts.get('total', 0)} jobs ({jobs})")
    print(f"median {median:.2f} s, min {min(times):.2f} s over {args.repeat} runs "
          f"on {os.cpu_count()} CPUs (goal: < {args.max_s:g} s)")
    return 0 if median <= args.max_s else 1


if __name__ == "__main__":
    sys.exit(main())
