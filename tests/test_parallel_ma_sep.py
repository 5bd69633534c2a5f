"""Strategy ma_sep on CPU gloo ranks (its parity: test_parallel_parity.py): the layout's
checks, bf16 on the wire, dropout inside a replica, the overlap, failure handling.

Rank functions live at module level: spawned ranks import them by this module's name
(tests/conftest.py keeps tests/ importable).
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from masep.config import ConfigError
from masep.parallel.layout import make_layout
from masep.parallel.ma_sep.attention import AttentionRank
from masep.testing import run_ranks
from parity import (CAPACITY, DROPLESS, HEAD_SPLIT, NEW_TOKENS, SHUFFLED, build, check_trainer_run, ma_sep,
                    make_batches, make_cfg, make_prompt, model_overrides, trainer_run)


def _ma_cfg(world: int, attn_tp: int, replicas: int, moe: int, in_flight: int, extra: list[str]):
    return make_cfg(ma_sep(attn_tp, replicas, moe, in_flight) + extra, world)


def world4_rank(rank, world):
    """Every world-4 scenario in one set of processes (starting ranks costs more than the steps):
    the dropout check, bf16, the overlap, and last a MoE rank failing mid-step."""
    return {"dropout": dropout_run(rank, world), "bf16": bf16_run(rank, world),
            "overlap": overlap_run(rank, world), "raise": failing_run(rank, world, "raise", 3, 4.0)}


@pytest.fixture(scope="module")
def world4():
    return run_ranks(4, world4_rank)


def test_layout_rejects_what_does_not_divide():
    with pytest.raises(ConfigError, match="3 MoE ranks do not divide 16 experts"):
        make_layout(_ma_cfg(4, 1, 1, 3, 1, DROPLESS))
    with pytest.raises(ConfigError, match="not world size 4"):
        make_layout(_ma_cfg(4, 2, 2, 2, 1, DROPLESS))
    with pytest.raises(ConfigError, match="does not divide 4 heads"):
        make_layout(_ma_cfg(5, 3, 1, 2, 1, DROPLESS))
    with pytest.raises(ConfigError, match="parallel.in_flight: micro-batches in flight must be positive"):
        make_layout(_ma_cfg(4, 1, 2, 2, 0, DROPLESS))


# ------------------------------------------------------------------ bf16 autocast

BF16 = DROPLESS + ["train.dtype=bf16"]


def _bf16_step(strategy, cfg) -> dict:
    stats = strategy.forward_backward(make_batches(cfg, 1)[0])
    return {"loss": stats.loss, "norm": strategy.grad_norm(),
            "tokens": strategy.generate(make_prompt(cfg), NEW_TOKENS).tokens}


def bf16_run(rank, world):
    """Rows travel in bf16 (the compute dtype) and come back as bf16 outputs and gradients."""
    cfg = _ma_cfg(world, 2, 1, 2, 2, BF16)
    strategy = build(cfg, rank)
    assert strategy.wire_dtype == torch.bfloat16
    return _bf16_step(strategy, cfg)


def test_bf16_autocast_matches_single_rank(world4):
    cfg = make_cfg(list(model_overrides(BF16)) + ["parallel.strategy=single"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only contends with the ranks
    try:
        ref = _bf16_step(build(cfg, 0), cfg)
    finally:
        torch.set_num_threads(threads)
    for res in (r["bf16"] for r in world4):
        assert res["loss"] == pytest.approx(ref["loss"], rel=1e-4)
        assert res["norm"] == pytest.approx(ref["norm"], rel=1e-3)
        assert torch.equal(res["tokens"], ref["tokens"])


# ------------------------------------------------------------------ dropout inside a replica


def dropout_run(rank, world):
    cfg = _ma_cfg(world, 2, 1, 2, 2, DROPLESS + ["model.dropout=0.2", "model.expert_dropout=0.1"])
    strategy = build(cfg, rank)  # as the trainer does: every rank its own seed
    stats = strategy.forward_backward(make_batches(cfg, 1)[0])
    return {"loss": stats.loss,
            "router": {n: p.grad.clone() for n, p in strategy.named_parameters() if "router" in n}}


def test_residual_dropout_is_replicated_inside_a_replica(world4):
    a, b = world4[0]["dropout"], world4[1]["dropout"]
    assert a["loss"] == b["loss"] and torch.isfinite(torch.tensor(a["loss"]))
    assert a["router"].keys() == b["router"].keys() and a["router"]
    for name in a["router"]:
        # Different masks on the two head shards would give different (replicated) gradients.
        assert torch.equal(a["router"][name], b["router"][name]), name


# ------------------------------------------------------------------ the two groups overlap

DELAY = 0.1  # seconds of stand-in work per attention layer and per expert call, each direction


class _SlowBackward(torch.autograd.Function):
    """Identity whose backward takes DELAY seconds (stands in for backward computation)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        time.sleep(DELAY)
        return grad


def _slowed(fn):
    def run(*args, **kwargs):
        time.sleep(DELAY)  # stands in for forward computation
        return _SlowBackward.apply(fn(*args, **kwargs))
    return run


def overlap_run(rank, world):
    """Step time with 1 and with 4 micro-batches in flight when every attention layer and every
    expert call takes DELAY seconds forward and backward. Sleeps keep this independent of how
    busy the CPU is: only the schedule decides whether the two groups wait on each other."""
    import torch.distributed as dist

    times = {}
    for in_flight in (1, 4):
        cfg = _ma_cfg(world, 2, 1, 2, in_flight, DROPLESS + ["model.layers=2"])
        strategy = build(cfg, rank)
        if isinstance(strategy, AttentionRank):
            for block in strategy.model.blocks:
                block.attention_residual = _slowed(block.attention_residual)
        else:
            for experts in strategy.experts:
                experts.forward = _slowed(experts.forward)
        batch = make_batches(cfg, 1)[0]
        dist.barrier()
        t0 = time.perf_counter()
        strategy.forward_backward(batch)
        times[in_flight] = time.perf_counter() - t0
    return times


def test_micro_batches_in_flight_overlap_attention_and_experts(world4):
    # 4 micro-batches, 2 layers, DELAY per piece: one at a time the groups take turns, 8 pieces
    # per micro-batch (4 forward, 4 backward), 3.2 s; four in flight keep both groups busy,
    # about 1.6 s. Ask for at least half of that saving.
    for r, times in enumerate(t["overlap"] for t in world4):
        assert times[1] > 8 * 4 * DELAY, times
        assert times[4] < times[1] - 0.8, f"rank {r}: no overlap: {times}"


# ------------------------------------------------------------------ a MoE rank fails mid-step


class Boom(RuntimeError):
    pass


def failing_run(rank, world, how, bad_rank, timeout_s):
    from masep.parallel.comm import PeerCommError
    from masep.parallel.ma_sep import experts

    cfg = _ma_cfg(world, 1, 2, 2, 2, DROPLESS + [f"parallel.timeout_s={timeout_s}"])
    strategy = build(cfg, rank)
    if rank == bad_rank:
        calls = {"n": 0}
        serve = experts.serve_forward

        def broken(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:  # mid-step: layer 1 of the first wave
                if how == "raise":
                    raise Boom("injected failure")
                time.sleep(cfg.parallel.timeout_s + 4)  # silent: alive, but answering nobody
            return serve(*args, **kwargs)

        experts.serve_forward = broken
    t0 = time.perf_counter()
    try:
        strategy.forward_backward(make_batches(cfg, 1)[0])
        return {"ok": True, "elapsed": time.perf_counter() - t0}
    except Boom as e:  # the failing rank leaves (its process ends after this)
        return {"ok": False, "error": "Boom", "message": str(e), "elapsed": time.perf_counter() - t0}
    except (PeerCommError, RuntimeError) as e:
        return {"ok": False, "error": type(e).__name__, "message": str(e), "elapsed": time.perf_counter() - t0}


def _check_failure(results: list[dict], timeout_s: float) -> None:
    assert not results[3]["ok"]
    for r in range(3):
        res = results[r]
        assert not res["ok"], f"rank {r} finished a step whose MoE rank failed"
        assert res["elapsed"] < timeout_s + 6, f"rank {r} took {res['elapsed']:.1f}s to notice"
    # The attention ranks wait on the MoE ranks: their error names the transfer and the peer.
    for r in range(2):
        assert results[r]["error"] == "PeerCommError", results[r]
        assert "rank(s) [" in results[r]["message"] and "3" in results[r]["message"], results[r]


def test_moe_rank_raising_mid_step_stops_the_others(world4):
    _check_failure([r["raise"] for r in world4], 4.0)


def test_silent_moe_rank_times_out_the_others():
    _check_failure(run_ranks(4, failing_run, "hang", 3, 3.0, timeout_s=60), 3.0)


# ------------------------------------------------------------------ balancing under the trainer

MOVING = ma_sep(1, 2, 2, 1) + ["model.expert_dropout=0.1"] + CAPACITY + HEAD_SPLIT + SHUFFLED


def moved_checkpoint_run(rank, world, ckpt_dir):
    """`trainer_run` with experts moving; then its checkpoint (a moved placement) loaded with
    balancing on and off: evaluation and greedy tokens of each."""
    from masep.runtime.trainer import Trainer

    out = trainer_run(rank, world, MOVING, ckpt_dir)
    for key, overrides in (("on", MOVING), ("off", [o for o in MOVING if o not in SHUFFLED])):
        cfg = make_cfg(overrides, world)
        trainer = Trainer(cfg, rank)
        trainer.resume(Path(ckpt_dir))
        out[key] = (trainer.strategy.evaluate(make_batches(cfg, 1)[0]),
                    trainer.strategy.generate(make_prompt(cfg), NEW_TOKENS).tokens)
    try:  # the split head cannot be read as a whole one
        Trainer(make_cfg([o for o in MOVING if o not in SHUFFLED + HEAD_SPLIT], world), rank).resume(Path(ckpt_dir))
    except ValueError as e:
        out["unsplit"] = str(e)
    return out


def test_resume_across_placement_changes_repeats_the_losses(tmp_path):
    """Experts and the head's vocabulary cut move after every step (the migrations are `p2p`); the
    checkpoint after step 2 holds a moved placement and cut, and the resumed run repeats the
    uninterrupted losses. Loaded without balancing, the checkpoint still routes by its placement
    and splits the head by its cut: the same evaluation and tokens."""
    results = run_ranks(4, moved_checkpoint_run, str(tmp_path), timeout_s=180)
    check_trainer_run(results, lambda rank: {"moe_dispatch", "p2p"} | ({"grad_sync"} if rank < 2 else set()))
    assert not torch.equal(results[0]["slot_of"], torch.arange(16))
    assert all(torch.equal(r["slot_of"], results[0]["slot_of"]) for r in results)
    for r in results:
        assert r["on"][0] == results[0]["on"][0] and torch.equal(r["on"][1], results[0]["on"][1])
        assert r["off"][0] == r["on"][0] and torch.equal(r["off"][1], r["on"][1])
        assert "resume it with ma.head_split=true" in r["unsplit"]


SKEW = ma_sep(1, 1, 2, 1) + DROPLESS + ["model.layers=2", "ma.rebalance=true", "ma.rebalance_every=10"]
SKEW_STEPS = 30  # three sync points


def skew_run(rank, world, runs: dict) -> None:
    """The trainer for each {run folder: per-expert delays}; the MoE ranks write their events."""
    from masep.runtime.trainer import Trainer

    for run_dir, delays in runs.items():
        cfg = make_cfg(SKEW + [f"ma.debug_expert_delay_s={delays}"], world)
        trainer = Trainer(cfg, rank)
        for batch in make_batches(cfg, SKEW_STEPS):
            trainer.train_step(batch)
        trainer.strategy.write_rows(run_dir, "skew")


def test_rebalancing_evens_a_two_x_slower_moe_rank_and_leaves_an_even_one_alone(tmp_path):
    """Experts 8-15 (MoE rank 1's) sleep 4 ms per (layer, micro-batch), experts 0-7 2 ms: rank 1
    is 2x slower. The first sync point moves experts, and by the window after the second one
    the measured max/mean of the MoE ranks' expert time is under 1.05; the predictor's error on
    the windows it had not trained on is under 10%. With 3 ms for every expert, no plan."""
    import pyarrow.parquet as pq

    skewed, even = tmp_path / "skewed", tmp_path / "even"
    skewed.mkdir()
    even.mkdir()
    runs = {str(skewed): {e: 0.002 if e < 8 else 0.004 for e in range(16)}, str(even): {e: 0.003 for e in range(16)}}
    run_ranks(3, skew_run, runs, timeout_s=300)
    events = [pq.read_table(skewed / f"balance_events-rank{r}.parquet").to_pylist() for r in (1, 2)]
    first, second, third = events[0]
    print("imbalance per window", [e["imbalance_before"] for e in events[0]], "after", third["imbalance_after"])
    assert [e["step"] for e in events[0]] == [9, 19, 29] and first["run_id"] == "skew"
    assert first["imbalance_before"] > 0.15 and first["plan_applied"] and first["moves"] > 0
    assert min(second["imbalance_before"], third["imbalance_before"]) < 0.05
    held_out = [abs(e["predicted_before_s"] - e["measured_before_s"]) / e["measured_before_s"]
                for rank in events for e in rank if e["predicted_before_s"] is not None]
    print(f"predictor MAPE on held-out windows: {100 * sum(held_out) / len(held_out):.1f}%")
    assert len(held_out) == 4 and sum(held_out) / len(held_out) < 0.10
    for r in (1, 2):
        assert not any(e["plan_applied"] for e in pq.read_table(even / f"balance_events-rank{r}.parquet").to_pylist())


HEAD_SKEW = ma_sep(1, 1, 1, 2) + DROPLESS + HEAD_SPLIT + ["model.layers=2", "ma.rebalance=true", "ma.rebalance_every=5"]
HEAD_SKEW_STEPS = 15  # three sync points


def head_skew_run(rank, world, runs: dict) -> None:
    """The trainer for each {run folder: head delay}; every rank writes its events."""
    from masep.runtime.trainer import Trainer

    for run_dir, delay in runs.items():
        cfg = make_cfg(HEAD_SKEW + [f"ma.debug_head_delay_s={delay}"], world)
        trainer = Trainer(cfg, rank)
        for batch in make_batches(cfg, HEAD_SKEW_STEPS):
            trainer.train_step(batch)
        trainer.strategy.write_rows(run_dir, "head-skew")


def _head_events(run_dir) -> dict:
    import pyarrow.parquet as pq

    return {r: [e for e in pq.read_table(run_dir / f"balance_events-rank{r}.parquet").to_pylist()
                if e["lever"] == "head"] for r in (0, 1)}


def test_head_split_moves_time_from_a_slower_attention_rank_to_the_moe_rank(tmp_path):
    """1 attention + 1 MoE rank; the head's forward sleeps 80 ms per micro-batch (shared by its
    rows): the attention rank, holding the whole head, is the slow side. The first sync point moves
    head rows to the MoE rank, and the measured imbalance of the two groups' busy times falls
    below half of what it was. Without the delay, the first window decides alone (CPU noise may
    move rows either way), and no event is lost."""
    slow, plain = tmp_path / "slow", tmp_path / "plain"
    slow.mkdir()
    plain.mkdir()
    run_ranks(2, head_skew_run, {str(slow): 0.08, str(plain): 0.0}, timeout_s=300)
    events = _head_events(slow)
    attention = events[0]
    print("head lever: group imbalance per window", [round(e["imbalance_before"], 3) for e in attention],
          "rows moved", [e["moves"] for e in attention],
          "busy s/step attention", [round(e["measured_before_s"], 4) for e in attention],
          "moe", [round(e["measured_before_s"], 4) for e in events[1]],
          "migration ms", [round(e["migration_ms"] or 0, 1) for e in attention])
    assert [e["step"] for e in attention] == [4, 9, 14] and len(events[1]) == 3
    assert [e["side"] for e in events[0] + events[1]] == ["attention"] * 3 + ["moe"] * 3
    first = attention[0]
    assert first["imbalance_before"] > 0.3 and first["plan_applied"] and first["moves"] > 0
    assert first["measured_before_s"] > events[1][0]["measured_before_s"]  # the attention side was the slow one
    assert min(e["imbalance_before"] for e in attention[1:]) < first["imbalance_before"] / 2
    assert [len(e) for e in _head_events(plain).values()] == [3, 3]
