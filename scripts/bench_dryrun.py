#!/usr/bin/env python
"""Time `snakemake -n` of the paper-scale DAG (1,024 shards in 106 tokenize jobs, 5 strategies x
10 seeds, 4 context lengths, the scaling sweep, 57 fault kinds of 20 trials: 467 jobs). Goal:
under 5 s.

Runs in an empty scratch folder that links to this checkout's workflow/, config/ and profiles/,
so that results already on disk do not shrink the DAG.

    python scripts/bench_dryrun.py [--repeat 3] [--configfile config/workflow-paper.yaml] [--max-s 5]
"""
from __future__ import annotations

import argparse
import os
import re
import resource
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


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def dry_run(workdir: Path, configfile: str, extra: list[str]) -> tuple[float, float, dict[str, int]]:
    """(wall seconds, CPU seconds, job counts) of one `snakemake -n`."""
    cpu0, start = _children_cpu_s(), time.perf_counter()
    out = subprocess.run(["snakemake", "-n", "--configfile", str(ROOT / configfile), *extra],
                         cwd=workdir, capture_output=True, text=True)
    elapsed, cpu = time.perf_counter() - start, _children_cpu_s() - cpu0
    if out.returncode != 0:
        sys.exit(f"snakemake -n failed:\n{out.stderr[-3000:]}")
    return elapsed, cpu, job_counts(out.stdout + out.stderr)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configfile", default="config/workflow-paper.yaml")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--max-s", type=float, default=5.0, help="exit 1 when the median exceeds this")
    args, extra = p.parse_known_args()
    with tempfile.TemporaryDirectory(prefix="masep-bench-") as tmp:
        workdir = scratch_project(Path(tmp))
        times, cpus = [], []
        for i in range(args.repeat):
            elapsed, cpu, counts = dry_run(workdir, args.configfile, extra)
            times.append(elapsed)
            cpus.append(cpu)
            print(f"run {i + 1}: {elapsed:.2f} s wall, {cpu:.2f} s CPU, {counts.get('total', 0)} jobs",
                  flush=True)
    median = statistics.median(times)
    jobs = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "total")
    print(f"snakemake -n of {args.configfile}: {counts.get('total', 0)} jobs ({jobs})")
    # CPU time as well: on a busy machine wall time also counts the waits for a core.
    print(f"median {median:.2f} s wall ({statistics.median(cpus):.2f} s CPU), min {min(times):.2f} s, "
          f"over {args.repeat} runs on {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} "
          f"(goal: < {args.max_s:g} s)")
    return 0 if median <= args.max_s else 1


if __name__ == "__main__":
    sys.exit(main())
