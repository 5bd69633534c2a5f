"""`masep sql`: query the results database, read-only.

`masep sql "SELECT ..."` prints the result as a table (DuckDB's own rendering) or, with --csv,
as CSV. Without a query it opens an interactive shell: the `duckdb` CLI when one on PATH can
open the file (the database is written in DuckDB's v1.4 storage format, which duckdb-cli 1.4
and later read), else a small built-in shell.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb

MAX_ROWS = 10_000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("query", nargs="?", help="SQL to run; omit for an interactive shell")
    p.add_argument("--db", default="results/masep.duckdb", help="database (default: %(default)s)")
    p.add_argument("--csv", action="store_true", help="print CSV instead of a table")


def _print(rel, as_csv: bool) -> None:
    if rel is None:  # a statement without a result (SET, PRAGMA ...)
        return
    if as_csv:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(rel.columns)
        w.writerows(rel.fetchall())
    else:
        sys.stdout.flush()
        # In a terminal, fit its width (DuckDB elides middle columns); piped, show every column.
        width = shutil.get_terminal_size().columns if sys.stdout.isatty() else 100_000
        rel.show(max_rows=MAX_ROWS, max_width=width, null_value="NULL")
        sys.stdout.flush()


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split("\n")[0].split())


def _cli_can_open(cli: str, db: Path) -> bool:
    try:
        probe = subprocess.run([cli, "-readonly", str(db), "-c", "SELECT 1"], capture_output=True,
                               text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0 and "Error" not in probe.stderr


def repl(con: duckdb.DuckDBPyConnection, stdin=sys.stdin) -> None:
    """Statements end with ';'. `.tables` lists tables and views, `.quit` leaves."""
    interactive = stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())
        print("masep sql (read-only). End statements with ';'. .tables lists tables, .quit leaves.")
    buffer: list[str] = []
    while True:
        try:
            line = input("masep> " if not buffer else "   ..> ") if interactive else stdin.readline()
        except EOFError:
            break
        if not interactive and line == "":
            break
        stripped = line.strip()
        if not buffer and stripped in (".quit", ".exit", ".q"):
            break
        if not buffer and stripped == ".tables":
            for (name,) in con.execute("SELECT table_name FROM duckdb_tables() UNION ALL "
                                       "SELECT view_name FROM duckdb_views() WHERE NOT internal "
                                       "ORDER BY 1").fetchall():
                print(name)
            continue
        if not stripped:
            continue
        buffer.append(line.rstrip("\n"))
        if stripped.endswith(";"):
            query, buffer = "\n".join(buffer), []
            try:
                _print(con.sql(query), as_csv=False)
            except duckdb.Error as e:
                print(f"error: {_one_line(e)}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    db = Path(args.db)
    if not db.exists():
        print(f"masep sql: no database at {db}; build it with `masep collect` (or `snakemake collect`)",
              file=sys.stderr)
        return 1
    if args.query is None:
        cli = shutil.which("duckdb")
        if cli and _cli_can_open(cli, db):
            return subprocess.call([cli, "-readonly", str(db)])
        if cli:
            print(f"masep sql: {cli} cannot open {db}; using the built-in shell", file=sys.stderr)
    try:
        con = duckdb.connect(str(db), read_only=True)
    except duckdb.Error as e:
        print(f"masep sql: cannot open {db}: {_one_line(e)}", file=sys.stderr)
        return 1
    with con:
        if args.query is None:
            repl(con)
            return 0
        try:
            _print(con.sql(args.query), args.csv)
        except duckdb.Error as e:
            print(f"masep sql: {_one_line(e)}", file=sys.stderr)
            return 1
        except BrokenPipeError:  # `masep sql ... | head`: the reader has what it wanted
            sys.stdout = open(os.devnull, "w")
    return 0
