"""Tensor plus pipeline parallelism (`tp_pp`) against the single-rank reference, on CPU gloo
ranks: the protocol of test_parallel_pp (step statistics, every gradient shard against the
matching slice of SingleRank's gradient, 3 AdamW steps, evaluation, greedy generation)."""
from __future__ import annotations

import pytest
import torch

from masep.model import build_model
from masep.parallel.layout import make_layout
from masep.testing import run_ranks
from test_parallel_pp import SEED, check_parity, exercise, full_names, make_config, reference


def tp_pp_rank(rank: int, world: int, runs: dict[str, list[str]]) -> dict:
    from masep.parallel.tp_pp import TensorPipelineParallel

    out = {}
    for name, overrides in runs.items():
        cfg = make_config(overrides + ["parallel.strategy=tp_pp", f"parallel.world_size={world}"])
        layout = make_layout(cfg)
        strategy = TensorPipelineParallel(cfg, layout, rank, "cpu", build_model(cfg.model, SEED))
        result = exercise(strategy, cfg)
        result["coords"] = layout.coords(rank)
        result["tp"] = layout.tp
        result["schedule"] = strategy.last_schedule
        result["checkpoint_keys"] = {n: strategy.checkpoint_key(n) for n, _ in strategy.named_parameters()}
        out[name] = result
    return out


def shard_reference(ref: dict, overrides: list[str], tp_rank: int, tp: int) -> dict:
    """The reference with each gradient cut to what TP rank `tp_rank` holds."""
    from masep.parallel.sharding import tp_shard

    cfg = make_config(overrides)
    return {**ref, "grads": {n: tp_shard(n, g, cfg.model, tp_rank, tp) for n, g in ref["grads"].items()}}


RUNS_4 = {
    # tp=2 x pp=2, one replica, 4 micro-batches: warm-up, steady 1F1B and cool-down all occur.
    "tp2-pp2-dropless": ["parallel.tp=2", "parallel.pp=2", "train.global_batch=8", "model.capacity_factor=null"],
    # Tokens are replicated inside a stage, so every TP rank routes (and drops) as one rank does.
    "tp2-pp2-capacity1": ["parallel.tp=2", "parallel.pp=2", "train.global_batch=8", "model.capacity_factor=1.0"],
}
RUNS_8 = {
    "tp2-pp2-dp2-capacity1": ["parallel.tp=2", "parallel.pp=2", "train.global_batch=16",
                              "model.capacity_factor=1.0"],
}


@pytest.fixture(scope="module")
def results_4() -> list[dict]:
    return run_ranks(4, tp_pp_rank, RUNS_4)


@pytest.fixture(scope="module")
def results_8() -> list[dict]:
    return run_ranks(8, tp_pp_rank, RUNS_8)


def check_run(overrides: list[str], results: list[dict]) -> None:
    ref = reference(overrides)
    if "model.capacity_factor=1.0" in overrides:
        assert ref["stats"].dropped > 0  # the capacity case really drops tokens
    names = full_names(overrides)
    for res in results:
        check_parity(shard_reference(ref, overrides, res["coords"]["tp"], res["tp"]), [res], set(res["grads"]))
    assert set().union(*(set(r["grads"]) for r in results)) == names
    for res in results:
        assert res["schedule"].p2p_s > 0
        assert res["schedule"].max_in_flight == 2 - res["coords"]["stage"]  # 1F1B over pp=2 stages
    # Shards of one parameter are saved under distinct keys; replicated ones under one key.
    keys: dict[str, set] = {}
    for res in results:
        for name, key in res["checkpoint_keys"].items():
            keys.setdefault(name, set()).add(key)
    assert len(keys["blocks.0.attn.qkv.weight"]) == results[0]["tp"]
    assert len(keys["blocks.0.moe.router.weight"]) == 1


@pytest.mark.parametrize("run", list(RUNS_4))
def test_tp_pp_matches_single_rank_4_ranks(run, results_4):
    check_run(RUNS_4[run], [r[run] for r in results_4])


@pytest.mark.slow  # 8 ranks on 2 cores: about half a minute, most of it 8 torch start-ups
@pytest.mark.parametrize("run", list(RUNS_8))
def test_tp_pp_matches_single_rank_8_ranks(run, results_8):
    results = [r[run] for r in results_8]
    check_run(RUNS_8[run], results)
    # The two replicas of each (stage, TP rank) hold identical gradients after the DP sum.
    by_place: dict[tuple, list[dict]] = {}
    for res in results:
        by_place.setdefault((res["coords"]["stage"], res["coords"]["tp"]), []).append(res)
    for copies in by_place.values():
        assert len(copies) == 2
        for name, g in copies[0]["grads"].items():
            assert torch.equal(g, copies[1]["grads"][name])
