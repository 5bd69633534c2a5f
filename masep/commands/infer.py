"""`masep infer`: decode with a KV cache at each context length and measure TPOT; with a
decoding fault (`fault.kind=kill_moe_decode`) the launcher injects it and restarts the job."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from masep.cli import add_config_arguments, add_strategy_arguments, config_from_args
from masep.config import Config, ConfigError, config_from_dict
from masep.launch import RankEntry, launch
from masep.parallel.layout import make_layout
from masep.runtime.distributed import init_distributed, shutdown_distributed


class InferEntry(RankEntry):
    def __init__(self, cfg: Config, out_dirs: list[str], checkpoint_run: Optional[str], experiment: str = "infer"):
        self.cfg_dict, self.out_dirs, self.checkpoint_run = cfg.to_dict(), list(out_dirs), checkpoint_run
        self.experiment = experiment

    def __call__(self):
        from masep.runtime.worker import infer_rank  # torch: in the ranks, not in this launcher

        cfg = config_from_dict(self.cfg_dict)
        info = init_distributed(cfg.parallel.timeout_s)
        try:
            return infer_rank(cfg, [Path(d) for d in self.out_dirs],
                              Path(self.checkpoint_run) if self.checkpoint_run else None,
                              info, self.experiment, self.resume)
        finally:
            sys.stdout.flush()
            shutdown_distributed(process_ends=cfg.launch.executor != "debug")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    add_strategy_arguments(p)
    p.add_argument("--out", required=True, nargs="+",
                   help="run folder, e.g. results/runs/infer/tp/ctx=512; several: one repeated decoding "
                        "trial in each, in turn, by the same ranks (one rank start-up for all)")
    p.add_argument("--checkpoint", default=None,
                   help="training run folder whose latest checkpoint supplies the weights "
                        "(default: the paper's initial weights)")
    p.add_argument("--experiment", default="infer",
                   help="experiment recorded in run.json: infer (default), faults for a decoding fault trial")


def run(args: argparse.Namespace) -> int:
    from masep.data.shards import shard_dirs
    from masep.runtime.checkpoint import CheckpointError, latest_checkpoint

    cfg = config_from_args(args)
    outs = [Path(d) for d in args.out]
    if len(set(outs)) < len(outs):
        raise ConfigError(f"--out: a run folder is named twice ({' '.join(args.out)}); name each trial's own")
    if cfg.fault.kind != "none" and len(outs) > 1:
        raise ConfigError(f"fault.kind={cfg.fault.kind}: a fault trial decodes into one run folder; "
                          f"--out names {len(outs)}")
    layout = make_layout(cfg)
    warn = lambda line: print(f"masep infer: {line}", file=sys.stderr)  # noqa: E731
    if args.checkpoint and latest_checkpoint(Path(args.checkpoint) / "checkpoint", warn) is None:
        raise CheckpointError(f"--checkpoint: no checkpoint under {args.checkpoint}/checkpoint; "
                              f"train that run first or name another run folder")
    shard_dirs(cfg)
    for out in outs:
        out.mkdir(parents=True, exist_ok=True)
    name = f"infer-{cfg.parallel.strategy}-" + "-".join(map(str, cfg.infer.context_lengths))
    injector = None
    if cfg.fault.kind != "none":
        from masep.faults import RECORD, Injector

        (outs[0] / RECORD).unlink(missing_ok=True)  # a trial's record is of its own fault only
        injector = Injector(cfg, layout, outs[0], job="infer")
    launch(InferEntry(cfg, [str(d) for d in outs], args.checkpoint, args.experiment), cfg, layout.world_size,
           name, Path(cfg.launch.log_dir) / name, run_dirs=outs, injector=injector)
    print(f"{name}: done; " + ", ".join(str(d / "run.json") for d in outs))
    return 0
