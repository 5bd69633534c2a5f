"""`masep collect`: build the results database from every complete run folder.

A run folder is complete when it holds `run.json` (rank 0 writes it last). `runs` holds one row
per run.json; each kind of per-rank Parquet file is named by its file prefix
(`steps-rank0.parquet` -> `steps`). The per-step kinds (IN_PLACE) are views over the run
folders' files, read where they lie; every other kind is copied into a table. Kinds without a
declared table (`faults`, `memory`, ...) get their files' own columns. The tables the report and
the paper-shaped views read (`loss_curve`, `run_summary`, `run_metrics`, ...) are computed here,
so the report needs the database only; queries of `steps`, `experts` or `telemetry` need the run
folders at the paths they were collected from. The SQL lives in `sql/*.sql`: `00_schema.sql`,
`10_load_runs.sql`, `22_load_peer.sql`, then every file numbered 50 or above, in name order. The
committed peer benchmark files (`peer`, scripts/bench_peer.py's JSON) become rows of
`peer_benchmark`.

A run.json that lists its files (`files`: name -> rows) is checked first: a missing, damaged or
short file refuses the whole collect with one line naming it, instead of a database that lacks
its rows.

The database is built in a temporary file beside the target and renamed over it, so readers
never see half a database and a failed collect leaves the previous one in place. Temporary
files of killed collects (their pid gone) are removed. Rows keep file order: the same run
folders give the same database.
"""
from __future__ import annotations

import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

import duckdb
import psutil
import pyarrow as pa

from masep.telemetry.writer import parquet_rows

SQL_DIR = Path(__file__).resolve().parent / "sql"
DECLARED_KINDS = ("steps", "experts", "eval", "inference")
# Kinds with a row per step (or telemetry sample) and rank: views over the run files, not copies.
# At the paper study's 40 M step and 160 M expert rows a copy took minutes; what the report and
# the paper-shaped views need of them is computed once into tables (sql/5*.sql, sql/6*.sql).
IN_PLACE = ("steps", "experts", "telemetry")
# Files are written in DuckDB's v1.4 storage format so that the newest `duckdb` CLI on PyPI
# (duckdb-cli 1.5.x; there is no 2.x CLI wheel) and any duckdb >= 1.4 can open them.
STORAGE_VERSION = "v1.4.0"
PARQUET_NAME = re.compile(r"^(?P<kind>[A-Za-z][A-Za-z0-9_-]*?)(?:-rank\d+)?\.parquet$")
# Names of the views and derived tables in sql/5*.sql and sql/6*.sql: a Parquet kind of the same
# name would clash. (memory, telemetry and energy_window are kinds the views stand in for when no
# run wrote them.)
RESERVED = {"runs", "run_steps", "loss_curve", "run_summary", "tpot_by_context", "paper_claims", "t_critical_95",
            "run_info", "steady_steps", "expert_shares", "run_metrics", "improvement_metrics",
            "run_values", "metric_means", "table1_performance", "table2_communication", "table3_memory",
            "table4_tpot", "energy", "load_balance", "model_quality", "scaling", "expert_utilization",
            "convergence", "memory_by_rank", "energy_by_rank", "repeat_stats", "predictor_accuracy", "ma_ablation",
            "robustness", "robustness_degradation", "fault_columns", "peer_benchmark"}


class CollectError(RuntimeError):
    pass


def _duckdb_version() -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", duckdb.__version__)[:2])


def check_files(run_json: Path) -> None:
    """Refuse a run whose run.json lists a file that is missing, damaged or holds other rows."""
    try:
        listed = json.loads(run_json.read_text()).get("files")
    except (OSError, ValueError, AttributeError) as e:
        raise CollectError(f"{run_json}: not a readable run record ({e}); run this run again") from e
    redo = "run it again afresh (Snakemake: --config fresh=true)"
    for name, rows in sorted((listed or {}).items()):
        path = run_json.parent / name
        if not path.exists():
            raise CollectError(f"{path}: missing (run.json lists {rows} rows); {redo}")
        try:
            found = parquet_rows(path)
        except (pa.ArrowException, OSError) as e:
            raise CollectError(f"{path}: damaged ({str(e).splitlines()[0]}); {redo}") from e
        if found != rows:
            raise CollectError(f"{path}: {found} rows where run.json lists {rows}; {redo}")


def find_runs(runs_root: Path) -> dict[Path, dict[str, list[Path]]]:
    """Complete run folders -> {kind: [parquet files]}, all sorted."""
    runs: dict[Path, dict[str, list[Path]]] = {}
    for run_json in sorted(runs_root.rglob("run.json")):
        check_files(run_json)
        folder = run_json.parent
        kinds: dict[str, list[Path]] = defaultdict(list)
        for f in sorted(folder.glob("*.parquet")):
            m = PARQUET_NAME.match(f.name)
            if m is None:
                print(f"masep collect: skipping {f}: not <kind>[-rank<R>].parquet", file=sys.stderr)
                continue
            kinds[m["kind"].lower().replace("-", "_")].append(f)
        runs[folder] = dict(kinds)
    return runs


def _sql(name: str) -> str:
    return (SQL_DIR / name).read_text()


def _view_files() -> list[Path]:
    return sorted(p for p in SQL_DIR.glob("*.sql") if p.name[:2].isdigit() and int(p.name[:2]) >= 50)


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _load_kind(con: duckdb.DuckDBPyConnection, kind: str, files: list[str], root: str) -> str:
    """The statement that loads one Parquet kind: a declared kind (00_schema.sql) keeps its
    declared columns and types, NULL where no file has the column, then the files' other columns;
    every row names its file (`source`). The per-step kinds (IN_PLACE) become views over their
    files, read where they lie; the rest are copied into a table."""
    scan = (f"read_parquet([{', '.join(map(_literal, files))}], union_by_name = true, filename = true, "
            "hive_partitioning = false)")
    present = [name for name, *_ in con.execute(f"DESCRIBE SELECT * FROM {scan}").fetchall() if name != "filename"]
    declared = con.execute("SELECT column_name, data_type FROM duckdb_columns() WHERE database_name = 'out' "
                           "AND table_name = $kind ORDER BY column_index", {"kind": kind}).fetchall()
    columns = [f'CAST("{name}" AS {type_}) AS "{name}"' if name in present else f'CAST(NULL AS {type_}) AS "{name}"'
               for name, type_ in declared if name != "source"]
    columns += [f'"{name}"' for name in present if name not in {n for n, _ in declared} | {"source"}]
    columns.append(f"substr(filename, {len(root) + 2}) AS source")
    drop = f'DROP TABLE "{kind}";\n' if declared else ""
    verb = "VIEW" if kind in IN_PLACE else "TABLE"
    return f'{drop}CREATE {verb} "{kind}" AS SELECT {", ".join(columns)} FROM {scan}'


def _build(con: duckdb.DuckDBPyConnection, root: Path, runs: dict, peer: list[Path]) -> dict[str, int]:
    """Load the runs and create the views; returns rows per loaded table (not the derived ones)."""
    root_s = str(root)
    con.execute(_sql("00_schema.sql"))
    if runs:
        con.execute(_sql("10_load_runs.sql"),
                    {"run_files": [str(d / "run.json") for d in runs], "root": root_s})
    by_kind: dict[str, list[str]] = defaultdict(list)
    for kinds in runs.values():
        for kind, files in kinds.items():
            by_kind[kind] += [str(f) for f in files]
    for kind in sorted(by_kind):
        if kind in RESERVED:
            print(f"masep collect: skipping {kind}*.parquet: {kind} is a reserved table name",
                  file=sys.stderr)
            continue
        con.execute(_load_kind(con, kind, by_kind[kind], root_s))
    if peer:
        con.execute(_sql("22_load_peer.sql"), {"files": [str(p) for p in peer]})
    counts = {name: con.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0]
              for name in sorted({"runs", "peer_benchmark", *DECLARED_KINDS, *(set(by_kind) - RESERVED)})}
    for view_file in _view_files():
        con.execute(view_file.read_text())
    dup = con.execute("SELECT run_id, list(run_dir ORDER BY run_dir) FROM runs "
                      "GROUP BY run_id HAVING count(*) > 1 ORDER BY run_id").fetchall()
    if dup:
        run_id, dirs = dup[0]
        raise CollectError(f"run_id {run_id!r} appears in several run folders: {', '.join(dirs)}")
    return counts


def remove_leftovers(db_path: Path) -> None:
    """Delete temporary databases (and WAL files) of collects whose process is gone."""
    for tmp in db_path.parent.glob(f".{db_path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not psutil.pid_exists(int(pid)):
            tmp.unlink(missing_ok=True)


def collect(runs_root: str | Path, db_path: str | Path, peer=()) -> dict[str, int]:
    """Build `db_path` from the complete runs under `runs_root` and the peer benchmark files
    `peer`; returns rows per table."""
    root = Path(runs_root).resolve()
    if not root.is_dir():
        raise CollectError(f"--runs: {runs_root} is not a directory")
    peer = [Path(p) for p in peer]
    for p in peer:
        if not p.is_file():
            raise CollectError(f"--peer: {p} is not a file (scripts/bench_peer.py's STEM.json)")
    db_path = Path(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = db_path.with_name(f".{db_path.name}.tmp-{os.getpid()}")
    remove_leftovers(db_path)
    tmp.unlink(missing_ok=True)
    runs = find_runs(root)
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")  # no bars in job logs
    try:
        quoted = str(tmp).replace("'", "''")
        # Older DuckDB (< 1.4) writes its own default format and does not know the option.
        option = f" (STORAGE_VERSION '{STORAGE_VERSION}')" if _duckdb_version() >= (1, 4) else ""
        con.execute(f"ATTACH '{quoted}' AS out{option}")
        con.execute("USE out")
        counts = _build(con, root, runs, peer)
        con.execute("USE memory")
        con.execute("DETACH out")
    except duckdb.Error as e:
        con.close()
        tmp.unlink(missing_ok=True)
        tmp.with_name(tmp.name + ".wal").unlink(missing_ok=True)
        raise CollectError(str(e).splitlines()[0]) from e
    except BaseException:
        con.close()
        tmp.unlink(missing_ok=True)
        tmp.with_name(tmp.name + ".wal").unlink(missing_ok=True)
        raise
    con.close()
    os.replace(tmp, db_path)
    return counts
