"""`masep train`: launch the ranks of one training run through submitit."""
from __future__ import annotations

import argparse
from pathlib import Path

from masep.cli import add_config_arguments, add_strategy_arguments, config_from_args
from masep.parallel.layout import make_layout


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    add_strategy_arguments(p)
    p.add_argument("--out", required=True, help="run folder, e.g. results/runs/train/tp/seed=0")
    p.add_argument("--experiment", default="train",
                   help="experiment recorded in run.json: train (default), or faults for a fault trial")


def run(args: argparse.Namespace) -> int:
    from masep.data.batches import shard_dirs
    from masep.launch import launch
    from masep.runtime.worker import TrainEntry

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
    results = launch(TrainEntry(cfg, str(out), args.experiment), cfg, layout.world_size, name, Path(cfg.launch.log_dir) / name,
                     run_dir=out, injector=injector)
    print(f"{name}: done, final loss {results[0]['final_loss']:.4f}; {out / 'run.json'}")
    return 0
