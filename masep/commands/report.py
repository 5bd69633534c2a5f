"""`masep report`: figures and an HTML page from the results database."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from masep.report.render import ReportError, render


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default="results/masep.duckdb", help="results database (default: %(default)s)")
    p.add_argument("--out", default="reports", help="output folder (default: %(default)s)")
    p.add_argument("--bench", default=None, metavar="DIR",
                   help="GPU benchmark runs to show, a runs root (default: bench/runs in the current "
                        "folder, where it exists)")


def run(args: argparse.Namespace) -> int:
    bench = args.bench if args.bench is not None else ("bench/runs" if Path("bench/runs").is_dir() else None)
    try:
        written = render(args.db, args.out, bench)
    except ReportError as e:
        print(f"masep report: {e}", file=sys.stderr)
        return 1
    print(f"masep report: wrote {len(written)} files; open {Path(args.out) / 'index.html'}")
    return 0
