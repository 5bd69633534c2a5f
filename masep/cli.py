"""`masep` command line: every Snakemake rule calls one of these subcommands.

Each subcommand is a module `masep/commands/<name>.py` exposing `add_arguments(parser)` and
`run(args) -> int`; it is imported only when its command runs so that `masep --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import traceback

from masep import __version__
from masep.config import ConfigError
from masep.errors import ExpectedError, one_line

AGAIN = "files are written whole or not at all: run the same command again to continue"
COMMANDS = {  # name -> help; the command is masep/commands/<name>.py
    "tokenize": "tokenize one C4 shard into uint16 token files",
    "train": "train one strategy (launches its ranks)",
    "infer": "decode with a KV cache and measure TPOT",
    "collect": "build results/masep.duckdb from run folders",
    "report": "render reports/ from the database",
    "sql": "query the results database",
    "layout": "show or check the rank layout of a strategy",
}


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """The --config/--set pair every config-driven command takes."""
    p.add_argument("--config", "-c", action="append", default=None,
                   help="preset name (tiny, paper, h200) or YAML path; repeat to layer")
    p.add_argument("--set", dest="overrides", action="append", nargs="+", default=[],
                   metavar="KEY=VALUE", help="dotted override, e.g. model.hidden=128 train.steps=3")


def add_strategy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", default=None, help="parallel.strategy (single, tp, pp, tp_pp, ep_dp, ma_sep)")
    p.add_argument("--world-size", type=int, default=None, help="parallel.world_size (ranks)")


def config_from_args(args: argparse.Namespace):
    from masep.config import load_config

    flags = []
    if getattr(args, "strategy", None):
        flags.append(f"parallel.strategy={args.strategy}")
    if getattr(args, "world_size", None):
        flags.append(f"parallel.world_size={args.world_size}")
    overrides = flags + [o for group in args.overrides for o in group]
    return load_config(args.config or ["tiny"], overrides)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="masep", description="MA Separation experiment pipeline")
    parser.add_argument("--version", action="version", version=f"masep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints usage / error and exits
        return 2
    name = argv[0]
    module = importlib.import_module(f"masep.commands.{name}")
    cmd = argparse.ArgumentParser(prog=f"masep {name}", description=COMMANDS[name])
    module.add_arguments(cmd)
    cmd.add_argument("-v", "--verbose", action="store_true",
                     help="on a failure, show the traceback too (or set MASEP_TRACEBACK=1)")
    args = cmd.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"masep {name}: interrupted; {AGAIN}", file=sys.stderr)
        return 130
    except SystemExit as e:  # SIGTERM handlers exit with 128 + the signal's number
        if isinstance(e.code, int) and e.code > 128:
            print(f"masep {name}: stopped by signal {e.code - 128} ({signal.strsignal(e.code - 128)}); {AGAIN}",
                  file=sys.stderr)
        raise
    except ExpectedError as e:
        if args.verbose or os.environ.get("MASEP_TRACEBACK") == "1":
            traceback.print_exc()
        kind = "config error: " if isinstance(e, ConfigError) else ""
        print(f"masep {name}: {kind}{one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
