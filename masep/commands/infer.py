"""`masep infer`: decode with a KV cache at each context length and measure TPOT; with a
decoding fault (`fault.kind=kill_moe_decode`) the launcher injects it and restarts the job."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from masep.cli import add_config_arguments, add_strategy_arguments, config_from_args
from masep.config import Config, config_from_dict
from masep.launch import RankEntry, launch
from masep.parallel.layout import make_layout
from masep.runtime.distributed import init_distributed, shutdown_distributed
from masep.runtime.worker import infer_rank


class InferEntry(RankEntry):
    def __init__(self, cfg: Config, out_dir: str, checkpoint_run: Optional[str], experiment: str = "infer"):
        self.cfg_dict, self.out_dir, self.checkpoint_run = cfg.to_dict(), str(out_dir), checkpoint_run
        self.experiment = experiment

    def __call__(self):
        cfg = config_from_dict(self.cfg_dict)
        info = init_distributed(cfg.parallel.timeout_s)
        try:
            return infer_rank(cfg, Path(self.out_dir), Path(self.checkpoint_run) if self.checkpoint_run else None,
                              info, self.experiment, self.resume)
        finally:
            sys.stdout.flush()
            shutdown_distributed()


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    add_strategy_arguments(p)
    p.add_argument("--out", required=True, help="run folder, e.g. results/runs/infer/tp/ctx=512")
    p.add_argument("--checkpoint", default=None,
                   help="training run folder whose latest checkpoint supplies the weights "
                        "(default: the paper's initial weights)")
    p.add_argument("--experiment", default="infer",
                   help="experiment recorded in run.json: infer (default), faults for a decoding fault trial")


def run(args: argparse.Namespace) -> int:
    from masep.data.batches import shard_dirs
    from masep.runtime.checkpoint import CheckpointError, latest_checkpoint

    cfg = config_from_args(args)
    layout = make_layout(cfg)
    warn = lambda line: print(f"masep infer: {line}", file=sys.stderr)  # noqa: E731
    if args.checkpoint and latest_checkpoint(Path(args.checkpoint) / "checkpoint", warn) is None:
        raise CheckpointError(f"--checkpoint: no checkpoint under {args.checkpoint}/checkpoint; "
                              f"train that run first or name another run folder")
    shard_dirs(cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"infer-{cfg.parallel.strategy}-" + "-".join(map(str, cfg.infer.context_lengths))
    injector = None
    if cfg.fault.kind != "none":
        from masep.faults import RECORD, Injector

        (out / RECORD).unlink(missing_ok=True)  # a trial's record is of its own fault only
        injector = Injector(cfg, layout, out, job="infer")
    launch(InferEntry(cfg, str(out), args.checkpoint, args.experiment), cfg, layout.world_size, name,
           Path(cfg.launch.log_dir) / name, run_dir=out, injector=injector)
    print(f"{name}: done; {out / 'run.json'}")
    return 0
