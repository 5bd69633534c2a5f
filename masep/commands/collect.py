"""`masep collect`: build the results database from every complete run folder."""
from __future__ import annotations

import argparse
import glob
import sys

from masep.results.collect import CollectError, collect


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", default="results/runs", help="root of the run folders (default: %(default)s)")
    p.add_argument("--db", default="results/masep.duckdb", help="database to (re)build (default: %(default)s)")
    p.add_argument("--peer", nargs="*", default=None, metavar="JSON",
                   help="peer benchmark results of scripts/bench_peer.py to load into peer_benchmark "
                        "(default: bench/peer-*.json in the current folder; --peer alone loads none)")


def run(args: argparse.Namespace) -> int:
    try:
        peer = args.peer if args.peer is not None else sorted(glob.glob("bench/peer-*.json"))
        counts = collect(args.runs, args.db, peer)
    except CollectError as e:
        print(f"masep collect: {e}", file=sys.stderr)
        return 1
    rows = ", ".join(f"{k}={v}" for k, v in counts.items())
    print(f"masep collect: {counts.get('runs', 0)} complete run(s) from {args.runs} -> {args.db} ({rows})")
    return 0
