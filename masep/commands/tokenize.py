"""`masep tokenize`: tokenize C4 shards here, or in one CPU job under `launch.executor=slurm`."""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from submitit.helpers import Checkpointable

from masep.cli import add_config_arguments, config_from_args
from masep.data.c4 import SHARD_COUNT, C4ReadError
from masep.data.shards import shard_dir
from masep.data.tokenize import available_cpus, summary, tokenize_shard
from masep.launch import LaunchError, launch


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--shard", type=int, action="append", default=None, metavar="N",
                   help="C4 shard index to tokenize (repeatable; default: every shard in data.shards)")
    p.add_argument("--threads", type=int, default=None,
                   help="encoding threads (default: the CPUs this process may use)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through the cleanup of the temporary shard


class TokenizeEntry(Checkpointable):
    """What a SLURM job of `masep tokenize` runs: the shards in turn (a shard whose manifest
    verifies is skipped, so a requeued or re-run job continues where it stopped)."""

    def __init__(self, data_cfg, shards: list[int], threads: int):
        self.data_cfg, self.shards, self.threads = data_cfg, shards, threads

    def __call__(self) -> list[str]:
        lines = []
        for index in self.shards:
            status, manifest = tokenize_shard(self.data_cfg, index, threads=self.threads, progress=False)
            lines.append(summary(index, status, manifest, shard_dir(self.data_cfg, index)))
            print(lines[-1], flush=True)
        return lines


def _run_on_slurm(cfg, shards: list[int], threads: int) -> int:
    """One SLURM job of one task with `threads` CPUs and no GPU, instead of the login node."""
    import dataclasses

    job_cfg = dataclasses.replace(cfg, launch=dataclasses.replace(
        cfg.launch, nodes=1, gpus_per_node=0, cpus_per_task=threads))
    name = f"tokenize-{cfg.data.source}-" + "-".join(str(i) for i in shards[:4]) + ("-..." if len(shards) > 4 else "")
    try:
        lines = launch(TokenizeEntry(cfg.data, shards, threads), job_cfg, 1, name,
                       Path(cfg.launch.log_dir) / name)[0]
    except LaunchError as e:
        print(f"masep tokenize: {e}", file=sys.stderr)
        return 1
    for line in lines:
        print(line, flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    shards = args.shard if args.shard is not None else cfg.data.shards
    bad = [i for i in shards if not 0 <= i < SHARD_COUNT]
    if bad:
        print(f"masep tokenize: --shard {bad[0]}: C4 shards are numbered 0..{SHARD_COUNT - 1}",
              file=sys.stderr)
        return 2
    if cfg.launch.executor == "slurm":
        return _run_on_slurm(cfg, list(shards), args.threads or cfg.launch.cpus_per_task)
    threads = args.threads or available_cpus()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        for index in shards:
            try:
                status, manifest = tokenize_shard(cfg.data, index, threads=threads,
                                                  progress=not args.no_progress)
            except C4ReadError as e:
                print(f"masep tokenize: {e}", file=sys.stderr)
                return 1
            print(summary(index, status, manifest, shard_dir(cfg.data, index)), flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
