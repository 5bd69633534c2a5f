"""`masep infer`: decode with a KV cache at each context length and measure TPOT."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from masep.cli import add_config_arguments, add_strategy_arguments, config_from_args
from masep.parallel.layout import make_layout


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    add_strategy_arguments(p)
    p.add_argument("--out", required=True, help="run folder, e.g. results/runs/infer/tp/ctx=512")
    p.add_argument("--checkpoint", default=None,
                   help="training run folder whose latest checkpoint supplies the weights "
                        "(default: the paper's initial weights)")


def run(args: argparse.Namespace) -> int:
    from masep.data.batches import shard_dirs
    from masep.launch import launch
    from masep.runtime.checkpoint import CheckpointError, latest_checkpoint
    from masep.runtime.worker import InferEntry

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
    launch(InferEntry(cfg, str(out), args.checkpoint), cfg, layout.world_size, name,
           Path(cfg.launch.log_dir) / name, run_dir=out)
    print(f"{name}: done; {out / 'run.json'}")
    return 0
