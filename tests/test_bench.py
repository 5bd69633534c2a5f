"""The GPU benchmark writes ordinary run folders that `masep collect` loads like any run.

Uses tiny CPU benchmark runs made here and the committed H200 run bench/runs/bench/single/20261129T101631Z.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from masep.bench.table import build, find_runs, markdown
from masep.results.collect import collect

ROOT = Path(__file__).resolve().parent.parent
V5 = ROOT / "bench" / "runs"
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
SMALL = ["train.global_batch=8", "train.micro_batch=2", "infer.context_lengths=[32]", "infer.new_tokens=4"]
# What GPU machines may lack: the benchmark's imports must not need them.
BLOCKED = "import sys, runpy; sys.modules.update(dict.fromkeys(['submitit', 'duckdb', 'datasets', 'snakemake']));" \
          " runpy.run_module('masep.bench', run_name='__main__')"


def _bench(tmp_path: Path, *args: str, ranks: int = 1) -> Path:
    cmd = [sys.executable, "-c", BLOCKED] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), "-m", "masep.bench"]
    res = subprocess.run(cmd + ["--config", "tiny", "--steps", "3", "--decode", "--out", str(tmp_path / "runs"), *args],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp_path / "runs"


def _metric(con, run_id: str, metric: str, x=None):
    return con.execute("SELECT value, reason FROM run_metrics WHERE run_id = ? AND metric = ? "
                       "AND x IS NOT DISTINCT FROM ?", [run_id, metric, x]).fetchone()


def test_cpu_benchmark_is_a_run(tmp_path):
    runs = _bench(tmp_path, "--set", *SMALL)
    (folder,) = [p.parent for p in runs.rglob("run.json")]
    assert sorted(p.name for p in folder.iterdir()) == [
        "energy_window-rank0.parquet", "inference-rank0.parquet", "memory-rank0.parquet", "run.json",
        "steps-rank0.parquet", "telemetry-rank0.parquet"]
    run = json.loads((folder / "run.json").read_text())
    run_id = run["run_id"]
    assert run_id.startswith("bench/single/") and run["experiment"] == "bench" and run["decode_path"]
    collect(runs, tmp_path / "x.duckdb")
    with duckdb.connect(str(tmp_path / "x.duckdb"), read_only=True) as con:
        assert con.execute("SELECT experiment, strategy, world_size, status FROM runs").fetchall() == [
            ("bench", "single", 1, "completed")]
        assert con.execute("SELECT count(*) FROM steps").fetchone() == (3,)
        assert con.execute("SELECT context_len, batch, new_tokens FROM inference").fetchall() == [(32, 1, 4)]
        # CPU: no MFU and no GPU energy, each with its reason; throughput measured after warm-up
        assert _metric(con, run_id, "mfu_pct") == (None, "no GPU peak for CPU")
        assert _metric(con, run_id, "energy_per_token_mj") == (None, "no GPU")
        assert _metric(con, run_id, "throughput_tok_s")[0] > 0
        assert _metric(con, run_id, "tpot_ms", 32)[0] > 0
    table = markdown(build(find_runs(runs)))
    assert "| single | 1 |" in table and "not measured (no GPU)" in table


def test_committed_h200_run_reaches_duckdb(tmp_path):
    (run,) = find_runs(V5)
    collect(V5, tmp_path / "x.duckdb")
    run_id = "bench/single/20261129T101631Z"
    with duckdb.connect(str(tmp_path / "x.duckdb"), read_only=True) as con:
        assert con.execute("SELECT run_id, experiment, strategy FROM runs").fetchall() == [(run_id, "bench", "single")]
        mfu_pct, reason = _metric(con, run_id, "mfu_pct")
        assert reason is None and mfu_pct == pytest.approx(47.6, abs=0.5)  # the measurement of 2026-11-29
        assert _metric(con, run_id, "energy_per_token_mj")[0] == pytest.approx(12.18, abs=0.01)
        assert _metric(con, run_id, "tpot_ms", 512)[0] == pytest.approx(0.881, abs=1e-3)
    t = build([run])
    assert t.header.startswith("NVIDIA H200, torch 2.11.0+cu130, 2026-11-29T10:16:31Z")
    assert t.rows[0][:7] == ["single", "1", "1167", "56161", "56161", "1.00x", "47.4%"]
    assert t.rows[0][-4:] == ["0.88 (1.7x)", "0.83 (1.6x)", "0.84 (1.6x)", "0.88 (1.5x)"]


def test_benchmark_runs_any_world_size_under_torchrun(tmp_path):
    """ma_sep on 4 CPU ranks (2 attention replicas, 2 MoE ranks): one run folder of every rank."""
    runs = _bench(tmp_path, "--label", "ma_sep4", "--set", "parallel.strategy=ma_sep", "parallel.attn_tp=1",
                  "parallel.attn_replicas=2", "parallel.moe_ranks=2", *SMALL, ranks=4)
    (run,) = find_runs(runs)
    assert run["run_id"].startswith("bench/ma_sep4/") and run["world_size"] == 4
    assert {r["rank"] for r in run["steps"]} == {0, 1, 2, 3} == {r["rank"] for r in run["energy_window"]}
    assert all(r["comm_moe_dispatch_s"] > 0 for r in run["steps"] if r["rank"] < 2)
    assert {r["rank"] for r in run["inference"]} == {0, 1, 2, 3}
    t = build([run])
    assert t.rows[0][:2] == ["ma_sep4", "4"] and any(n.startswith("ma_sep step") for n in t.notes)
