"""Strategy `ep_dp` beyond parity (test_parallel_parity.py): the trainer with a checkpoint, and a
rank dying mid-step (tp and ep_dp)."""
from __future__ import annotations

import pytest

from masep.testing import run_ranks
from parity import CAPACITY, DROPLESS, check_trainer_run, dying_rank, trainer_run

TRAINER = ["parallel.strategy=ep_dp", "model.expert_dropout=0.1"] + CAPACITY


@pytest.fixture(scope="module")
def trainer4(tmp_path_factory):
    return run_ranks(4, trainer_run, TRAINER, str(tmp_path_factory.mktemp("ep-checkpoints")), timeout_s=120)


def test_ep_dp_under_the_trainer_resumes_exactly(trainer4):
    check_trainer_run(trainer4, {"moe_dispatch", "grad_sync"})


def test_rank_dying_mid_step_fails_the_others_within_timeout(tmp_path):
    timeout, world = 5.0, 4
    phases = [(["parallel.strategy=tp", "parallel.tp=4"] + DROPLESS, 2), (["parallel.strategy=ep_dp"] + DROPLESS, 1)]
    phases = [(o + [f"parallel.timeout_s={timeout}"], bad) for o, bad in phases]
    results = run_ranks(world, dying_rank, phases, str(tmp_path), timeout_s=120)
    for phase, (overrides, bad) in enumerate(phases):
        got = [r[phase] for r in results]
        assert got[bad]["error"] == "RuntimeError" and "injected failure" in got[bad]["message"]
        for rank, r in enumerate(got):
            if rank != bad:
                assert r["error"] is not None, f"{overrides[0]}: rank {rank} finished a step its peer never joined"
                # A collective waited for the silent peer and gave up after the timeout (or saw
                # the connection of a peer that had given up a moment earlier close).
                assert "Timed out" in r["message"] or "Connection closed" in r["message"], (overrides[0], rank, r)
                assert r["elapsed"] < timeout + 30, (overrides[0], rank, r)
