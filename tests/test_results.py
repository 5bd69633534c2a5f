"""masep collect / masep sql on run folders that the tests write themselves.

The folders follow docs/ARCHITECTURE.md's run-folder contract; their numbers are made up for
the test and only ever live in tmp_path.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from masep.results.collect import CollectError, collect
from helpers import write_sample_run

@pytest.fixture
def study(tmp_path) -> Path:
    root = tmp_path / "runs"
    write_sample_run(root, "train", "single", "seed=0", steps=10, evals=[(5, 4.0), (10, 3.5)])
    write_sample_run(root, "train", "single", "seed=1", steps=10, seed=1, evals=[(10, 3.6)])
    write_sample_run(root, "train", "ep_dp", "seed=0", world_size=2, steps=10, extra_kinds=("faults",),
                     drop_step_columns=("comm_p2p_s", "idle_s"))
    write_sample_run(root, "train", "tp", "seed=0", world_size=2, steps=3, complete=False)  # still running
    write_sample_run(root, "infer", "single", "ctx=512", contexts=(512,))
    write_sample_run(root, "infer", "single", "ctx=1024", contexts=(1024,))
    return root


def _tables(db: Path) -> dict:
    """Every table's rows; floats to 12 significant digits, since DuckDB's parallel aggregates
    (stddev, avg) may add in another order and differ in the last bit from one collect to the next."""
    def cell(v):
        return float(f"{v:.12g}") if isinstance(v, float) else v

    with duckdb.connect(str(db), read_only=True) as con:
        names = [n for (n,) in con.execute("SELECT table_name FROM duckdb_tables() ORDER BY 1").fetchall()]
        return {n: [tuple(map(cell, row)) for row in con.execute(f'SELECT * FROM "{n}"').fetchall()] for n in names}


def test_collect_loads_complete_runs_only(study, tmp_path):
    db = tmp_path / "out" / "masep.duckdb"
    counts = collect(study, db)
    assert counts == {"eval": 3, "experts": 16, "faults": 2, "inference": 2, "peer_benchmark": 0, "runs": 5, "steps": 40}
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT run_dir, strategy, seed, world_size, status, config->>'$.model.hidden', "
                           "epoch(ended_at) - epoch(started_at) FROM runs ORDER BY run_dir").fetchall() == [
            ("infer/single/ctx=1024", "single", 0, 1, "completed", "64", 30.0),
            ("infer/single/ctx=512", "single", 0, 1, "completed", "64", 30.0),
            ("train/ep_dp/seed=0", "ep_dp", 0, 2, "completed", "64", 30.0),
            ("train/single/seed=0", "single", 0, 1, "completed", "64", 30.0),
            ("train/single/seed=1", "single", 1, 1, "completed", "64", 30.0)]
        # the incomplete tp run contributes nothing
        assert con.execute("SELECT count(*) FROM steps WHERE run_id LIKE '%tp%'").fetchone() == (0,)
        # columns a file lacks are NULL, not zero; the declared schema is complete
        assert con.execute("SELECT count(*), count(idle_s), count(comm_p2p_s) FROM steps "
                           "WHERE run_id = 'train-ep_dp-seed=0'").fetchone() == (20, 0, 0)
        assert con.execute("SELECT DISTINCT source FROM steps WHERE run_id = 'train-single-seed=0'"
                           ).fetchall() == [("train/single/seed=0/steps-rank0.parquet",)]
        # an undeclared kind becomes its own table
        assert con.execute("SELECT run_id, rank, recovery_s FROM faults ORDER BY rank").fetchall() == [
            ("train-ep_dp-seed=0", 0, 1.5), ("train-ep_dp-seed=0", 1, 1.5)]


def test_run_summary_view(study, tmp_path):
    db = tmp_path / "masep.duckdb"
    collect(study, db)
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("SELECT strategy, seed, steps, warmup_steps_excluded, tokens_per_s, step_time_s, "
                           "final_step, final_loss, final_val_loss, dropped_tokens "
                           "FROM run_summary ORDER BY strategy, seed").fetchall()
    # 10 steps: the first (10%) is warm-up, so the slow first step (128 tok/s) is left out
    # dropped tokens: each rank reports the global count of its step, so rank 0 alone is summed
    # throughput: tokens over time of the steady steps (256 / 0.5), not the rows' own tokens_per_s
    assert rows == [("ep_dp", 0, 10, 1, 512.0, 0.5, 10, 0.0, None, 55),
                    ("single", 0, 10, 1, 512.0, 0.5, 10, 0.0, 3.5, 55),
                    ("single", 1, 10, 1, 512.0, 0.5, 10, 0.0, 3.6, 55)]


def test_tpot_view(study, tmp_path):
    db = tmp_path / "masep.duckdb"
    collect(study, db)
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT strategy, context_len, tpot_ms, prefill_ms, samples FROM tpot_by_context "
                           "ORDER BY context_len").fetchall() == [("single", 512, 1.512, 5.12, 1),
                                                                 ("single", 1024, 2.024, 10.24, 1)]


def test_collect_is_idempotent_and_atomic(study, tmp_path):
    db = tmp_path / "masep.duckdb"
    collect(study, db)
    first = _tables(db)
    collect(study, db)
    assert _tables(db) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masep.duckdb", "runs"]  # no temp left
    # a broken run.json fails the collect with one line and leaves the old database in place
    (study / "train" / "single" / "seed=1" / "run.json").write_text("{not json")
    with pytest.raises(CollectError) as e:
        collect(study, db)
    assert "\n" not in str(e.value) and "run.json" in str(e.value)
    assert _tables(db) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masep.duckdb", "runs"]


def test_empty_study_has_empty_tables(tmp_path):
    (tmp_path / "runs").mkdir()
    counts = collect(tmp_path / "runs", tmp_path / "masep.duckdb")
    assert counts == {"eval": 0, "experts": 0, "inference": 0, "peer_benchmark": 0, "runs": 0, "steps": 0}
    with duckdb.connect(str(tmp_path / "masep.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM run_summary").fetchone() == (0,)
    with pytest.raises(CollectError, match="--runs: .* is not a directory"):
        collect(tmp_path / "nope", tmp_path / "masep.duckdb")


def test_duplicate_run_ids_are_refused(tmp_path):
    root = tmp_path / "runs"
    a = write_sample_run(root, "train", "single", "seed=0", steps=2)
    b = root / "train" / "single" / "seed=0-copy"
    b.mkdir()
    for f in a.iterdir():
        (b / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CollectError, match="run_id 'train-single-seed=0' appears in several run folders"):
        collect(root, tmp_path / "masep.duckdb")


def _masep(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "masep.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_cli_collect_and_sql(study, tmp_path):
    db = tmp_path / "masep.duckdb"
    out = _masep("collect", "--runs", str(study), "--db", str(db))
    assert out.returncode == 0, out.stderr
    assert "5 complete run(s)" in out.stdout and "steps=40" in out.stdout
    out = _masep("sql", "--db", str(db), "SELECT strategy, count(*) AS n FROM runs GROUP BY 1 ORDER BY 1")
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if "ep_dp" in line or "single" in line]
    assert len(lines) == 2 and "1" in lines[0] and "4" in lines[1]
    out = _masep("sql", "--db", str(db), "--csv", "SELECT strategy, seed FROM run_summary ORDER BY 1, 2")
    assert out.stdout.splitlines() == ["strategy,seed", "ep_dp,0", "single,0", "single,1"]
    # read-only: writes are refused, and the database is unchanged
    out = _masep("sql", "--db", str(db), "DELETE FROM runs")
    assert out.returncode == 1 and "read-only" in out.stderr.lower()
    out = _masep("sql", "--db", str(db), "SELEC nonsense")
    assert out.returncode == 1 and out.stderr.count("\n") <= 3
    out = _masep("sql", "--db", str(tmp_path / "missing.duckdb"), "SELECT 1")
    assert out.returncode == 1 and "no database" in out.stderr and "masep collect" in out.stderr


def test_sql_repl_without_duckdb_cli(study, tmp_path):
    db = tmp_path / "masep.duckdb"
    collect(study, db)
    env = dict(os.environ, PATH="/nonexistent")  # no duckdb CLI on PATH: the built-in REPL
    out = subprocess.run([sys.executable, "-m", "masep.cli", "sql", "--db", str(db)],
                         input="SELECT count(*) AS n\nFROM runs;\n.tables\n", capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "5" in out.stdout and "run_summary" in out.stdout and "steps" in out.stdout
