"""`masep layout`: show the rank layout of a strategy as one JSON document (an impossible one
fails with its reason)."""
from __future__ import annotations

import argparse
import json

from masep.cli import add_config_arguments, config_from_args
from masep.parallel.layout import make_layout


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)


def run(args: argparse.Namespace) -> int:
    layout = make_layout(config_from_args(args))
    ranks = [{"rank": r, **layout.coords(r)} for r in range(layout.world_size)]
    print(json.dumps({**layout.to_dict(), "ranks": ranks}, indent=2))
    return 0
