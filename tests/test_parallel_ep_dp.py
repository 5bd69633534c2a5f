"""Strategy `ep_dp` against the single-rank reference, and a rank dying mid-step (tp and ep_dp).

The harness (batches, training loop, reference, parity assertions) is test_parallel_tp's.
"""
from __future__ import annotations

import pytest
import torch

from test_parallel_tp import (CAPACITY, DROPLESS, TP, assert_parity, check_dying_rank, check_trainer_run,
                              model_overrides, parity_rank, reference)
from masep.testing import run_ranks

EP = "masep.parallel.ep_dp:ExpertDataParallel"
CASES = [["parallel.strategy=ep_dp"] + DROPLESS, ["parallel.strategy=ep_dp"] + CAPACITY]
WORLD = 4
EXPERTS = 16


TRAINER = ["parallel.strategy=ep_dp", "model.expert_dropout=0.1"] + CAPACITY


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    cases = [(EP, o, "steps") for o in CASES] + [(EP, TRAINER, "trainer")]
    return run_ranks(WORLD, parity_rank, cases, str(tmp_path_factory.mktemp("ep-checkpoints")), timeout_s=120)


def expert_shard(rank: int, world: int = WORLD):
    n = EXPERTS // world

    def shard(name: str, full: torch.Tensor) -> torch.Tensor:
        return full[rank * n:(rank + 1) * n] if name.endswith(("w_up", "w_down")) else full
    return shard


@pytest.mark.parametrize("case", range(len(CASES)), ids=["dropless", "capacity"])
def test_ep_dp_matches_single_rank_on_4_ranks(world4, case):
    ref = reference(model_overrides(CASES[case]))
    for rank, per_case in enumerate(world4):
        got = per_case[case]
        assert_parity(got, ref, expert_shard(rank))
        assert set(got["grads"]) == set(ref["grads"])  # everything is held, experts as a slice
        assert got["comm"]["moe_dispatch"] > 0 and got["comm"]["grad_sync"] > 0
        assert got["comm"]["attn_allreduce"] == 0


def test_ep_dp_matches_single_rank_on_8_ranks():
    """The 8-GPU layout (ep 8: two experts per rank) with capacity drops, decoding included."""
    overrides = CASES[1] + ["train.global_batch=16"]  # a micro-batch per replica
    results = run_ranks(8, parity_rank, [(EP, overrides, "steps")], timeout_s=180)
    ref = reference(model_overrides(overrides))
    for rank, per_case in enumerate(results):
        assert_parity(per_case[0], ref, expert_shard(rank, 8))


def test_ep_dp_capacity_drops_tokens_like_one_rank(world4):
    """Capacity is applied per micro-batch on the routing rank: the test data must drop some,
    or the capacity case above would not test it."""
    assert world4[0][1]["dropped"] == reference(model_overrides(CASES[1]))["dropped"] > 0


def test_ep_dp_under_the_trainer_resumes_exactly(world4):
    check_trainer_run([per_case[len(CASES)] for per_case in world4], {"moe_dispatch", "grad_sync"})


def test_rank_dying_mid_step_fails_the_others_within_timeout(tmp_path):
    check_dying_rank(tmp_path, [(TP, ["parallel.strategy=tp", "parallel.tp=4"] + DROPLESS, 2),
                                (EP, ["parallel.strategy=ep_dp"] + DROPLESS, 1)], world=WORLD, timeout=5.0)
