"""Every strategy against the single-rank reference (tests/parity.py), at 4 and 8 CPU gloo
ranks, in the layouts each strategy runs: the same step-0 loss, aux losses, expert counts and
gradients, three more optimizer steps, evaluation and greedy tokens; plus what each strategy's
communication and schedule must show."""
from __future__ import annotations

import pytest
import torch

from masep.parallel.layout import make_layout
from masep.testing import run_ranks
from parity import CAPACITY, DROPLESS, HEAD_SPLIT, SHUFFLED, check_parity, ma_sep, make_cfg, moves_experts, parity_rank

TP, EP, PP, TP_PP = (["parallel.strategy=tp"], ["parallel.strategy=ep_dp"], ["parallel.strategy=pp"],
                     ["parallel.strategy=tp_pp"])
# name: (world, overrides, prompt batch)
CASES = {
    "tp4-dropless": (4, TP + ["parallel.tp=4"] + DROPLESS, 2),
    "tp4-capacity": (4, TP + ["parallel.tp=4"] + CAPACITY, 2),
    "tp2dp2-dropless": (4, TP + ["parallel.tp=2"] + DROPLESS, 2),
    "tp2dp2-capacity": (4, TP + ["parallel.tp=2"] + CAPACITY, 2),
    "ep_dp4-dropless": (4, EP + DROPLESS, 2),
    "ep_dp4-capacity": (4, EP + CAPACITY, 2),
    # pp=2 x dp=2, 4 micro-batches per replica: warm-up, steady 1F1B and cool-down all occur.
    "pp2dp2-dropless": (4, PP + ["parallel.pp=2", "train.global_batch=16"] + DROPLESS, 2),
    # Tied embeddings: first and last stage sum the matrix's gradient.
    "pp2dp2-capacity-tied": (4, PP + ["parallel.pp=2", "train.global_batch=16", "model.tie_embeddings=true"]
                             + CAPACITY, 2),
    "pp4-dropless": (4, PP + ["parallel.pp=4"] + DROPLESS, 2),  # one layer per stage, one replica
    "tp2pp2-dropless": (4, TP_PP + ["parallel.tp=2", "parallel.pp=2"] + DROPLESS, 2),
    # Tokens are replicated inside a stage, so every TP rank routes (and drops) as one rank does.
    "tp2pp2-capacity": (4, TP_PP + ["parallel.tp=2", "parallel.pp=2"] + CAPACITY, 2),
    "ma_sep-tp2-moe2-seq-dropless": (4, ma_sep(2, 1, 2, 1) + DROPLESS, 2),
    "ma_sep-tp2-moe2-pipe2-capacity": (4, ma_sep(2, 1, 2, 2) + CAPACITY, 3),
    "ma_sep-r2-moe2-pipe2-dropless": (4, ma_sep(1, 2, 2, 2) + DROPLESS, 2),  # the replicas split the prompts
    "ma_sep-r2-moe2-seq-capacity": (4, ma_sep(1, 2, 2, 1) + CAPACITY, 3),  # 3 prompts: replica 0 decodes
    # Capacity over the whole decode batch (top-2, factor 1.0, 8 prompts, 2 replicas), as on one rank.
    "ma_sep-r2-moe2-capacity-8-prompts": (4, ma_sep(1, 2, 2, 2) + CAPACITY, 8),
    # Balancing moves experts (a random placement) after every step; decoded again after step 0.
    "ma_sep-tp2-moe2-pipe2-capacity-shuffled": (4, ma_sep(2, 1, 2, 2) + CAPACITY + SHUFFLED, 3),
    "ma_sep-r2-moe2-seq-dropless-shuffled": (4, ma_sep(1, 2, 2, 1) + DROPLESS + SHUFFLED, 2),
    # ... and the output head's vocabulary cut between the groups moves too (random from the start).
    "ma_sep-tp2-moe2-pipe2-capacity-head-shuffled": (4, ma_sep(2, 1, 2, 2) + CAPACITY + SHUFFLED + HEAD_SPLIT, 3),
    "ma_sep-r2-moe2-pipe2-dropless-head-shuffled": (4, ma_sep(1, 2, 2, 2) + DROPLESS + SHUFFLED + HEAD_SPLIT, 2),
    # The 8-GPU layouts.
    "tp4dp2-capacity": (8, TP + ["parallel.tp=4"] + CAPACITY, 2),
    "ep_dp8-capacity": (8, EP + ["train.global_batch=16"] + CAPACITY, 2),  # two experts per rank
    "pp2dp4-capacity": (8, PP + ["parallel.pp=2", "train.global_batch=32"] + CAPACITY, 2),
    "tp2pp2dp2-capacity": (8, TP_PP + ["parallel.tp=2", "parallel.pp=2", "train.global_batch=16"] + CAPACITY, 2),
    "ma_sep-tp2-r2-moe4-pipe2-capacity": (8, ma_sep(2, 2, 4, 2) + CAPACITY, 2),
    "ma_sep-tp2-r2-moe4-pipe2-capacity-head-shuffled": (8, ma_sep(2, 2, 4, 2) + CAPACITY + SHUFFLED + HEAD_SPLIT, 2),
}


def _run(world: int) -> dict:
    names = [n for n, (w, _, _) in CASES.items() if w == world]
    per_rank = run_ranks(world, parity_rank, [CASES[n][1:] for n in names], timeout_s=180)
    return {n: [r[i] for r in per_rank] for i, n in enumerate(names)}


@pytest.fixture(scope="module")
def world4() -> dict:
    return _run(4)


@pytest.fixture(scope="module")
def world8() -> dict:
    return _run(8)


def check_strategy(results: list, overrides: list) -> None:
    """What the strategy's own communication and schedule must show."""
    layout = make_layout(make_cfg(overrides, len(results)))
    for rank, res in enumerate(results):
        c, comm = layout.coords(rank), res["comm"]
        if layout.strategy == "tp":
            assert comm["attn_allreduce"] > 0 and comm["moe_dispatch"] > 0
            assert (comm["grad_sync"] > 0) == (layout.dp > 1)
        if layout.strategy == "ep_dp":
            assert comm["moe_dispatch"] > 0 and comm["grad_sync"] > 0 and comm["attn_allreduce"] == 0
        if layout.strategy in ("pp", "tp_pp"):
            sched = res["schedule"]
            assert 0 < sched.compute_s < sched.wall_s and sched.p2p_s > 0  # every stage has a neighbour
            # 1F1B, not all-forwards-then-all-backwards: stage s holds at most pp - s micro-batches.
            assert sched.max_in_flight == layout.pp - c["stage"]
        if layout.strategy == "ma_sep":
            assert comm["moe_dispatch"] > 0
            if c["role"] == "attention":
                assert (comm["attn_allreduce"] > 0) == (layout.attn_tp > 1)
                assert (comm["grad_sync"] > 0) == (layout.attn_replicas > 1)
            # every rank reports the latencies measured where the tokens arrive (rank 0)
            assert res["token_s"] == results[0]["token_s"] and all(t > 0 for t in res["token_s"])
            # every rank follows one placement; with forced moves it is no longer the initial one
            assert torch.equal(res["slot_of"], results[0]["slot_of"])
            assert torch.equal(res["slot_of"], torch.arange(len(res["slot_of"]))) != moves_experts(overrides)
    if layout.strategy in ("pp", "tp_pp"):  # replicas of a stage shard hold identical gradients
        by_place: dict = {}
        for rank, res in enumerate(results):
            c = layout.coords(rank)
            by_place.setdefault((c["stage"], c["tp"]), []).append(res)
        for copies in by_place.values():
            for other in copies[1:]:
                for name, g in copies[0]["grads"].items():
                    assert torch.equal(g, other["grads"][name]), name
    if layout.strategy == "tp_pp":  # shards of one parameter are saved under distinct keys
        keys: dict = {}
        for res in results:
            for name, key in res["checkpoint_keys"].items():
                keys.setdefault(name, set()).add(key)
        assert len(keys["blocks.0.attn.qkv.weight"]) == layout.tp
        assert len(keys["blocks.0.moe.router.weight"]) == 1


@pytest.mark.parametrize("name", [n for n, (w, _, _) in CASES.items() if w == 4])
def test_matches_single_rank_on_4_ranks(world4, name):
    _, overrides, prompt_batch = CASES[name]
    check_parity(world4[name], overrides, prompt_batch)
    check_strategy(world4[name], overrides)


@pytest.mark.slow  # 8 ranks on 2 cores, most of it 8 torch start-ups
@pytest.mark.parametrize("name", [n for n, (w, _, _) in CASES.items() if w == 8])
def test_matches_single_rank_on_8_ranks(world8, name):
    _, overrides, prompt_batch = CASES[name]
    check_parity(world8[name], overrides, prompt_batch)
    check_strategy(world8[name], overrides)
