"""`balance_events` and `predictor_accuracy` in the results database, from a run folder the test
writes (made-up numbers that only live in tmp_path)."""
from __future__ import annotations

import dataclasses

import duckdb
import pytest

from masep.parallel.balance import BalanceEvent
from masep.results.collect import collect
from masep.telemetry.writer import write_parquet
from helpers import write_sample_run


def _event(rank: int, step: int, side: str, predicted: float, measured: float, plan: bool) -> BalanceEvent:
    return BalanceEvent(run_id="train-ma_sep-seed=0", step=step, rank=rank, side=side,
                        predicted_before_s=predicted, measured_before_s=measured,
                        predicted_after_s=predicted * 0.8 if plan else predicted,
                        measured_after_s=None if step == 200 else measured * 0.8,
                        imbalance_before=0.3 if plan else 0.01, imbalance_after=None if step == 200 else 0.02,
                        predicted_imbalance_before=0.28 if plan else 0.01,
                        predicted_imbalance_after=0.01 if plan else None,
                        plan_applied=plan, moves=4 if plan else 0, migration_ms=12.5 if plan else None)


def test_balance_events_and_predictor_accuracy(tmp_path):
    root = tmp_path / "runs"
    folder = write_sample_run(root, "train", "ma_sep", "seed=0", world_size=2, steps=3)
    write_sample_run(root, "train", "single", "seed=0", steps=3)  # no balancing: no rows
    for rank in range(2):
        rows = [_event(rank, 100, "moe", 1.1, 1.0, True), _event(rank, 100, "attention", 0.9, 1.0, False),
                _event(rank, 200, "moe", 1.0 + 0.02 * rank, 1.0, False)]
        write_parquet(folder / f"balance_events-rank{rank}.parquet", [dataclasses.asdict(r) for r in rows])
    db = tmp_path / "masep.duckdb"
    counts = collect(root, db)
    assert counts["balance_events"] == 6
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT step, side, plan_applied, moves, migration_ms, measured_after_s FROM balance_events "
                           "WHERE rank = 1 ORDER BY step, side").fetchall() == [
            (100, "attention", False, 0, None, 0.8), (100, "moe", True, 4, 12.5, 0.8), (200, "moe", False, 0, None, None)]
        got = con.execute("SELECT side, step, ranks, mape_pct FROM predictor_accuracy").fetchall()
        assert [g[:3] for g in got] == [("attention", 100, 2), ("moe", 100, 2), ("moe", 200, 2)]
        assert [g[3] for g in got] == pytest.approx([10.0, 10.0, 1.0])


def test_study_without_balancing_has_empty_balance_views(tmp_path):
    root = tmp_path / "runs"
    write_sample_run(root, "train", "single", "seed=0", steps=3)
    db = tmp_path / "masep.duckdb"
    assert "balance_events" not in collect(root, db)
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM balance_events").fetchone() == (0,)
        assert con.execute("SELECT count(*) FROM predictor_accuracy").fetchone() == (0,)


def test_ma_ablation_lists_plain_ma_sep_beside_its_variants(tmp_path):
    import json

    root = tmp_path / "runs"
    write_sample_run(root, "train", "ma_sep", "seed=0", world_size=2, steps=10)
    write_sample_run(root, "train", "tp", "seed=0", world_size=2, steps=10)  # not ma_sep: not listed
    for label, ma, compression in (("ma_sep+paper", True, "int8"), ("ma_sep+int8", False, "int8")):
        folder = write_sample_run(root, "ablation", label, "seed=0", world_size=2, steps=10)
        record = json.loads((folder / "run.json").read_text())
        record["strategy"] = "ma_sep"
        record["config"].update(ma={"rebalance": ma}, train={"grad_compression": compression})
        (folder / "run.json").write_text(json.dumps(record))
        if ma:
            write_parquet(folder / "balance_events-rank1.parquet",
                          [{**dataclasses.asdict(_event(1, s, "moe", 1.0, 1.0, s == 5)), "run_id": record["run_id"]}
                           for s in (5, 10)])
    db = tmp_path / "masep.duckdb"
    collect(root, db)
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("SELECT experiment, variant, sync_points, plans_applied, final_loss, tokens_per_s "
                           "FROM ma_ablation").fetchall()
    assert [r[:4] for r in rows] == [("train", "plain", None, None), ("ablation", "+ int8", None, None),
                                     ("ablation", "paper (rebalance + int8)", 2, 1)]
    assert all(r[4] == 0.0 and r[5] == 512.0 for r in rows)  # the last step's loss; steady steps' speed
