"""`masep train`: launch the ranks of one training run through submitit."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from masep.cli import add_config_arguments, add_strategy_arguments, config_from_args
from masep.config import Config, config_from_dict
from masep.launch import RankEntry, launch
from masep.parallel.layout import make_layout
from masep.runtime.distributed import init_distributed, shutdown_distributed


class TrainEntry(RankEntry):
    def __init__(self, cfg: Config, out_dir: str, experiment: str = "train"):
        self.cfg_dict, self.out_dir, self.experiment = cfg.to_dict(), str(out_dir), experiment

    def __call__(self):
        from masep.runtime.worker import train_rank  # torch: in the ranks, not in this launcher

        cfg = config_from_dict(self.cfg_dict)
        info = init_distributed(cfg.parallel.timeout_s)
        try:
            return train_rank(cfg, Path(self.out_dir), info, self.experiment)
        finally:
            sys.stdout.flush()
            shutdown_distributed(process_ends=cfg.launch.executor != "debug")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    add_strategy_arguments(p)
    p.add_argument("--out", required=True, help="run folder, e.g. results/runs/train/tp/seed=0")
    p.add_argument("--experiment", default="train",
                   help="experiment recorded in run.json: train (default), ablation for a labelled variant, "
                        "faults for a fault trial")


def run(args: argparse.Namespace) -> int:
    from masep.data.shards import shard_dirs

    cfg = config_from_args(args)
    layout = make_layout(cfg)  # an impossible layout fails here, before any process starts
    shard_dirs(cfg)  # so do missing or corrupt token shards
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"train-{cfg.parallel.strategy}-seed{cfg.train.seed}"
    injector = None
    if cfg.fault.kind != "none":
        from masep.faults import Injector

        (out / "faults.json").unlink(missing_ok=True)  # a trial's record is of its own fault only
        injector = Injector(cfg, layout, out)
    results = launch(TrainEntry(cfg, str(out), args.experiment), cfg, layout.world_size, name,
                     Path(cfg.launch.log_dir) / name, run_dirs=[out], injector=injector)
    final = next(r["final_loss"] for r in results if r is not None)  # None: a rank lost under ma.failover
    print(f"{name}: done, final loss {final:.4f}; {out / 'run.json'}")
    return 0
