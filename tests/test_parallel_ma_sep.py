"""Strategy ma_sep: parity with SingleRank on CPU gloo ranks, and failure handling.

Rank functions live at module level: spawned ranks import them by this module's name
(tests/conftest.py keeps tests/ importable).
"""
from __future__ import annotations

import contextlib
import functools
import time

import pytest
import torch

from masep.config import ConfigError, load_config
from masep.model import build_model
from masep.parallel.layout import make_layout
from masep.parallel.single import SingleRank
from masep.parallel.tp import tp_shard
from masep.telemetry.timing import comm_timer
from masep.testing import run_ranks

SEED = 7
BASE = ["model.vocab_size=1000", "data.seq_len=32", "train.global_batch=8", "train.micro_batch=2",
        "model.hidden=64", "model.heads=4",
        "model.experts=16", "model.expert_hidden=64", "model.dropout=0.0", "model.expert_dropout=0.0",
        "parallel.timeout_s=20"]
DROPLESS = ["model.capacity_factor=null"]
CAPACITY = ["model.capacity_factor=1.0"]
STEPS = 3  # optimizer steps after step 0
NEW_TOKENS = 5


def _batch(seed: int, vocab: int):
    from masep.parallel.base import GlobalBatch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (8, 33), generator=g)
    mask = torch.ones(8, 32)
    mask[1, :5] = 0  # some targets do not count
    mask[6, 20:] = 0
    return GlobalBatch(ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), mask)


def _prompt(batch: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, 6), generator=torch.Generator().manual_seed(99))


def _train(strategy, vocab: int) -> dict:
    """Step 0 (stats and gradients), then STEPS more AdamW steps (losses)."""
    comm_timer().reset()
    first = strategy.forward_backward(_batch(0, vocab))
    grads = {n: p.grad.detach().clone() for n, p in strategy.named_parameters()}
    comm = comm_timer().totals()
    params = [p for _, p in strategy.named_parameters()]
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for step in range(STEPS + 1):
        if step > 0:
            losses.append(strategy.forward_backward(_batch(step, vocab)).loss)
        strategy.clip_gradients(1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
    return {"loss": first.loss, "lb": first.lb_loss, "z": first.z_loss, "tpe": first.tokens_per_expert,
            "dropped": first.dropped, "grads": grads, "losses": losses, "comm": comm}


def _decode_and_evaluate(strategy, vocab: int, prompt_batch: int) -> dict:
    """Greedy decoding and evaluation with the trained weights."""
    gen = strategy.generate(_prompt(prompt_batch, vocab), NEW_TOKENS)
    return {"tokens": gen.tokens, "n_token_times": len(gen.token_s), "token_s": gen.token_s,
            "eval": strategy.evaluate(_batch(100, vocab))}


def _ma_cfg(world: int, attn_tp: int, replicas: int, moe: int, in_flight: int, extra: list[str]):
    return load_config("tiny", BASE + extra + [
        "parallel.strategy=ma_sep", f"parallel.world_size={world}", f"parallel.attn_tp={attn_tp}",
        f"parallel.attn_replicas={replicas}", f"parallel.moe_ranks={moe}", f"parallel.microbatches={in_flight}"])


def parity_run(rank, world, attn_tp, replicas, moe, in_flight, extra, prompt_batch):
    from masep.parallel.ma_sep import MASeparation

    cfg = _ma_cfg(world, attn_tp, replicas, moe, in_flight, extra)
    layout = make_layout(cfg)
    strategy = MASeparation(cfg, layout, rank, "cpu", build_model(cfg.model, SEED))
    out = _train(strategy, cfg.model.vocab_size)
    out.update(_decode_and_evaluate(strategy, cfg.model.vocab_size, prompt_batch))
    out["coords"] = layout.coords(rank)
    return out


@contextlib.contextmanager
def _one_thread():
    """These tensors are tiny: on 2 busy cores a second intra-op thread makes them ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _single_rank(extra) -> SingleRank:
    cfg = load_config("tiny", BASE + list(extra) + ["parallel.strategy=single", "parallel.world_size=1"])
    return SingleRank(cfg, make_layout(cfg), 0, "cpu", build_model(cfg.model, SEED))


@functools.lru_cache(maxsize=None)
def _trained_reference(extra: tuple):
    strategy = _single_rank(extra)
    with _one_thread():
        return strategy, _train(strategy, strategy.cfg.model.vocab_size)


@functools.lru_cache(maxsize=None)
def _reference(extra: tuple, prompt_batch: int) -> dict:
    strategy, trained = _trained_reference(extra)
    with _one_thread():
        return {**trained, **_decode_and_evaluate(strategy, strategy.cfg.model.vocab_size, prompt_batch)}


def _check_parity(results: list[dict], ref: dict, attn_tp: int, replicas: int, moe: int) -> None:
    cfg = load_config("tiny", BASE)
    covered = set()
    for r, res in enumerate(results):
        # (1) step-0 statistics: identical on every rank, equal to one rank's
        assert res["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert res["lb"] == pytest.approx(ref["lb"], rel=1e-5)
        assert res["z"] == pytest.approx(ref["z"], rel=1e-5)
        assert torch.equal(res["tpe"], ref["tpe"])
        assert res["dropped"] == ref["dropped"]
        # (2) gradients of this rank's parameters = its slices of the full gradients
        c = res["coords"]
        for name, g in res["grads"].items():
            if c["role"] == "moe":
                index, parts = c["moe_index"], moe
            else:
                index, parts = c["head_shard"], attn_tp
            want = tp_shard(name, ref["grads"][name], cfg.model, index, parts)
            torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6, msg=lambda m: f"rank {r} {name}: {m}")
            covered.add(name)
        # (3) further optimizer steps
        assert res["losses"] == pytest.approx(ref["losses"], rel=1e-4)
        # (4) greedy decoding, and evaluation
        assert torch.equal(res["tokens"], ref["tokens"])
        assert res["n_token_times"] == NEW_TOKENS - 1
        # every rank reports the latencies measured where the tokens arrive (rank 0)
        assert res["token_s"] == results[0]["token_s"] and all(t > 0 for t in res["token_s"])
        assert res["eval"][0] == pytest.approx(ref["eval"][0], rel=1e-5)
        assert res["eval"][1] == ref["eval"][1]
        # communication was timed under its kinds
        assert res["comm"]["moe_dispatch"] > 0
        if c["role"] == "attention":
            assert (res["comm"]["attn_allreduce"] > 0) == (attn_tp > 1)
            assert (res["comm"]["grad_sync"] > 0) == (replicas > 1)
    assert covered == set(ref["grads"]), "every parameter is held by some rank"


# World 4: (attn_tp, replicas, moe ranks, micro-batches in flight, capacity, prompt batch).
WORLD4 = {
    "tp2-r1-moe2-seq-dropless": (2, 1, 2, 1, DROPLESS, 2),
    "tp2-r1-moe2-pipe2-cap1": (2, 1, 2, 2, CAPACITY, 3),
    "tp1-r2-moe2-pipe2-dropless": (1, 2, 2, 2, DROPLESS, 2),  # the replicas split the prompt batch
    "tp1-r2-moe2-seq-cap1-replica0-decodes": (1, 2, 2, 1, CAPACITY, 3),  # 3 sequences: replica 0 decodes
}


def world4_rank(rank, world):
    """Every world-4 scenario in one set of processes (starting ranks costs more than the steps):
    the parity cases, the dropout check, and last a MoE rank failing mid-step."""
    out = {name: parity_run(rank, world, *case) for name, case in WORLD4.items()}
    out["dropout"] = dropout_run(rank, world)
    out["bf16"] = bf16_run(rank, world)
    out["overlap"] = overlap_run(rank, world)
    out["raise"] = failing_run(rank, world, "raise", 3, 4.0)
    return out


@pytest.fixture(scope="module")
def world4():
    return run_ranks(4, world4_rank)


@pytest.mark.parametrize("name", list(WORLD4))
def test_parity_world4(world4, name):
    attn_tp, replicas, moe, _, extra, prompt_batch = WORLD4[name]
    _check_parity([r[name] for r in world4], _reference(tuple(extra), prompt_batch), attn_tp, replicas, moe)


@pytest.mark.slow  # 8 ranks on 2 cores: 5-20 s depending on load, most of it 8 torch start-ups
def test_parity_world8_pipelined():
    # 2 replicas x 2-way heads + 4 MoE ranks, 2 micro-batches per replica in flight, capacity 1.0,
    # a prompt batch the two replicas split.
    results = run_ranks(8, parity_run, 2, 2, 4, 2, CAPACITY, 2)
    ref = _reference(tuple(CAPACITY), 2)
    assert ref["dropped"] > 0  # capacity 1.0 really drops here, and identically
    _check_parity(results, ref, 2, 2, 4)


def test_capacity_drops_in_reference():
    assert _reference(tuple(CAPACITY), 2)["dropped"] > 0
    assert _reference(tuple(DROPLESS), 2)["dropped"] == 0


def test_layout_rejects_what_does_not_divide():
    with pytest.raises(ConfigError, match="3 MoE ranks do not divide 16 experts"):
        make_layout(_ma_cfg(4, 1, 1, 3, 1, DROPLESS))
    with pytest.raises(ConfigError, match="not world size 4"):
        make_layout(_ma_cfg(4, 2, 2, 2, 1, DROPLESS))
    with pytest.raises(ConfigError, match="does not divide 4 heads"):
        make_layout(_ma_cfg(5, 3, 1, 2, 1, DROPLESS))


# ------------------------------------------------------------------ bf16 autocast

BF16 = DROPLESS + ["train.dtype=bf16"]


def _bf16_step(strategy, vocab: int) -> dict:
    stats = strategy.forward_backward(_batch(0, vocab))
    return {"loss": stats.loss, "norm": strategy.grad_norm(),
            "tokens": strategy.generate(_prompt(2, vocab), NEW_TOKENS).tokens}


def bf16_run(rank, world):
    """Rows travel in bf16 (the compute dtype) and come back as bf16 outputs and gradients."""
    from masep.parallel.ma_sep import MASeparation

    cfg = _ma_cfg(world, 2, 1, 2, 2, BF16)
    strategy = MASeparation(cfg, make_layout(cfg), rank, "cpu", build_model(cfg.model, SEED))
    assert strategy.wire_dtype == torch.bfloat16
    return _bf16_step(strategy, cfg.model.vocab_size)


def test_bf16_autocast_matches_single_rank(world4):
    single = _single_rank(BF16)
    with _one_thread():
        ref = _bf16_step(single, single.cfg.model.vocab_size)
    for res in (r["bf16"] for r in world4):
        assert res["loss"] == pytest.approx(ref["loss"], rel=1e-4)
        assert res["norm"] == pytest.approx(ref["norm"], rel=1e-3)
        assert torch.equal(res["tokens"], ref["tokens"])


# ------------------------------------------------------------------ dropout inside a replica


def dropout_run(rank, world):
    from masep.parallel.ma_sep import MASeparation

    cfg = _ma_cfg(world, 2, 1, 2, 2, DROPLESS + ["model.dropout=0.2", "model.expert_dropout=0.1"])
    torch.manual_seed(1000 + rank)  # as the trainer does: every rank its own seed
    strategy = MASeparation(cfg, make_layout(cfg), rank, "cpu", build_model(cfg.model, SEED))
    stats = strategy.forward_backward(_batch(0, cfg.model.vocab_size))
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

    from masep.parallel.ma_sep import MASeparation

    times = {}
    for in_flight in (1, 4):
        cfg = _ma_cfg(world, 2, 1, 2, in_flight, DROPLESS + ["model.layers=2"])
        strategy = MASeparation(cfg, make_layout(cfg), rank, "cpu", build_model(cfg.model, SEED))
        if strategy.is_attention:
            for block in strategy.model.blocks:
                block.attention_residual = _slowed(block.attention_residual)
        else:
            for experts in strategy.experts:
                experts.forward = _slowed(experts.forward)
        batch = _batch(0, cfg.model.vocab_size)
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
    from masep.parallel.ma_sep import MASeparation

    cfg = _ma_cfg(world, 1, 2, 2, 2, DROPLESS + [f"parallel.timeout_s={timeout_s}"])
    strategy = MASeparation(cfg, make_layout(cfg), rank, "cpu", build_model(cfg.model, SEED))
    if rank == bad_rank:
        calls = {"n": 0}
        serve = strategy._serve_forward

        def broken(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:  # mid-step: layer 1 of the first wave
                if how == "raise":
                    raise Boom("injected failure")
                time.sleep(cfg.parallel.timeout_s + 4)  # silent: alive, but answering nobody
            return serve(*args, **kwargs)

        strategy._serve_forward = broken
    t0 = time.perf_counter()
    try:
        strategy.forward_backward(_batch(0, cfg.model.vocab_size))
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
