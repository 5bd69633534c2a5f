"""Pipeline parallelism (`pp`) beyond parity (test_parallel_parity.py): the trainer with a
checkpoint, and a stage failing mid-step, on CPU gloo ranks."""
from __future__ import annotations

import time

import pytest

from masep.testing import run_ranks
from parity import DROPLESS, build, check_trainer_run, make_batches, make_cfg, trainer_run

TRAINER = ["parallel.strategy=pp", "parallel.pp=2", "train.global_batch=16", "model.expert_dropout=0.1"]
FAILURE_TIMEOUT_S = 5.0
FAILURE = ["parallel.strategy=pp", "parallel.pp=2", "train.global_batch=16",
           f"parallel.timeout_s={FAILURE_TIMEOUT_S}"] + DROPLESS
BAD_RANK = 1  # stage 1 of replica 0


def failure_run(rank: int, world: int) -> dict:
    """Rank `BAD_RANK` raises in the forward of its second micro-batch and leaves; every rank
    reports the error it ended with and how long it took to get there."""
    cfg = make_cfg(FAILURE, world)
    strategy = build(cfg, rank)
    if rank == BAD_RANK:
        calls = {"n": 0}

        def boom(module, args, output):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("injected failure")

        strategy.stage_module.blocks[str(strategy.layer_ids[0])].attn.register_forward_hook(boom)
    t0 = time.perf_counter()
    try:
        strategy.forward_backward(make_batches(cfg, 1)[0])
    except Exception as e:  # noqa: BLE001 - the test inspects what each rank saw
        return {"error": f"{type(e).__name__}: {e}", "elapsed": time.perf_counter() - t0}
    return {"error": None, "elapsed": time.perf_counter() - t0}


def pp_rank(rank: int, world: int, ckpt_dir: str) -> dict:
    """The trainer run, then the failure run last (it breaks the process group): one spawn of
    4 processes pays torch's start-up once for the whole file."""
    return {"trainer": trainer_run(rank, world, TRAINER, ckpt_dir), "failure": failure_run(rank, world)}


@pytest.fixture(scope="module")
def pp_results(tmp_path_factory) -> list[dict]:
    return run_ranks(4, pp_rank, str(tmp_path_factory.mktemp("pp-checkpoint")))


def test_pp_under_the_trainer_resumes_exactly(pp_results):
    check_trainer_run([r["trainer"] for r in pp_results], {"p2p", "grad_sync"})


def test_pp_rank_failure_stops_every_rank(pp_results):
    results = [r["failure"] for r in pp_results]
    assert "injected failure" in results[BAD_RANK]["error"]
    for rank in (0, 2, 3):
        assert results[rank]["error"] is not None, f"rank {rank} finished a step its peer never did"
        assert results[rank]["elapsed"] < FAILURE_TIMEOUT_S + 5.0
        # A clear error: which exchange failed, on which rank (not a bare transport message).
        assert (results[rank]["error"].startswith("PeerCommError")
                or "over the data-parallel group failed" in results[rank]["error"]), results[rank]["error"]
    # The stage waiting on the dead rank names it.
    assert "PeerCommError" in results[0]["error"] and f"[{BAD_RANK}]" in results[0]["error"]
