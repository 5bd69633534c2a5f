"""Aggregates over partly missing measurements: a missing value is left out, never counted as 0."""
from __future__ import annotations

import duckdb
import pytest

from masep.report.render import throughput_figure
from masep.results.collect import collect
from helpers import GPU, query, train_steps, windows, write_run_from_rows, write_sample_run


def test_energy_per_token_leaves_out_the_tokens_of_windows_without_a_reading(tmp_path):
    # rank 0 ran twice (a restart): 100 J over 1000 tokens, then 1000 tokens without an energy
    # reading; rank 1: 300 J over 1000 tokens. Per token: 100/1000 + 300/1000 J = 400 mJ.
    rank0, rank1 = windows(2, [100.0, 300.0], 1000, 50.0)
    unread = {**rank0, "segment_start_s": 50.0, "gpu_energy_j": None, "energy_reason": "NVML energy read failed"}
    root = tmp_path / "runs"
    run_id = write_run_from_rows(root, "ep_dp", "seed=0", 2, {"steps": train_steps(2, 10, 1000, 1.0),
                                                            "energy_window": [rank0, unread, rank1]}, GPU)
    db = tmp_path / "db.duckdb"
    collect(root, db)
    (mj,) = query(db, "SELECT value FROM run_metrics WHERE run_id = ? AND metric = 'energy_per_token_mj'", run_id)[0]
    assert mj == pytest.approx(400.0)


def test_report_leaves_a_run_without_steady_steps_out_of_the_throughput_mean(tmp_path):
    runs = tmp_path / "runs"
    write_sample_run(runs, "train", "single", "seed=0", steps=10)  # steady steps at 512 tokens/s
    write_sample_run(runs, "train", "single", "seed=1", steps=1, seed=1)  # only a warm-up step: no throughput
    db = tmp_path / "masep.duckdb"
    collect(runs, db)
    assert query(db, "SELECT seed, tokens_per_s FROM run_summary ORDER BY seed") == [(0, 512.0), (1, None)]
    with duckdb.connect(str(db), read_only=True) as con:
        _, table = throughput_figure(con)  # the report's throughput table
    # strategy, world size, runs, runs measured, mean, min, max
    assert [row[:7] for row in table.rows] == [("single", 1, 2, 1, 512.0, 512.0, 512.0)]
