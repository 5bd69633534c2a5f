"""The parity harness every strategy is checked with: one base config, one reference
(`SingleRank`), one protocol (a greedy decode from the initial weights, step 0 in detail, three
more AdamW steps, an evaluation), one comparison. Also the trainer run and the dying-rank run
the strategy test files share. Rank functions live at module level so spawned ranks import them.
"""
from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import pytest
import torch

from masep.config import load_config
from masep.model import build_model
from masep.parallel import build_strategy
from masep.parallel.base import GlobalBatch
from masep.parallel.layout import make_layout
from masep.parallel.sharding import tp_shard
from masep.telemetry.timing import comm_timer

BASE = ["data.seq_len=32", "train.global_batch=8", "train.micro_batch=2", "model.hidden=64", "model.heads=4",
        "model.experts=16", "model.expert_hidden=64", "model.vocab_size=1000", "model.vocab_pad_multiple=128",
        "model.dropout=0.0", "model.expert_dropout=0.0", "train.lr=0.01", "parallel.timeout_s=60"]
DROPLESS = ["model.capacity_factor=null"]
CAPACITY = ["model.capacity_factor=1.0"]
# ma_sep's balancing at every step, each sync point moving experts to a random placement.
SHUFFLED = ["ma.rebalance=true", "ma.rebalance_every=1", "ma.debug_shuffle_placement=true"]
STEPS = 4  # step 0 compared in detail, then the losses of 3 more optimizer steps
NEW_TOKENS = 6


def make_cfg(overrides: list[str], world: int = 1):
    return load_config("tiny", BASE + list(overrides) + [f"parallel.world_size={world}"])


def ma_sep(attn_tp: int, replicas: int, moe: int, in_flight: int) -> list[str]:
    return ["parallel.strategy=ma_sep", f"parallel.attn_tp={attn_tp}", f"parallel.attn_replicas={replicas}",
            f"parallel.moe_ranks={moe}", f"parallel.in_flight={in_flight}"]


def make_batches(cfg, n: int) -> list[GlobalBatch]:
    """Deterministic random global batches; some targets masked out."""
    gen = torch.Generator().manual_seed(1234)
    G, T, V = cfg.train.global_batch, cfg.data.seq_len, cfg.model.vocab_size
    out = []
    for _ in range(n):
        inputs = torch.randint(0, V, (G, T), generator=gen)
        targets = torch.randint(0, V, (G, T), generator=gen)
        mask = (torch.rand(G, T, generator=gen) > 0.1).float()
        out.append(GlobalBatch(inputs, targets, mask))
    return out


def make_prompt(cfg, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, cfg.model.vocab_size, (batch, 8), generator=torch.Generator().manual_seed(99))


def build(cfg, rank: int):
    model = build_model(cfg.model, cfg.train.seed)
    torch.manual_seed(cfg.train.seed * 1000 + rank)  # per-rank streams, as the trainer seeds them
    return build_strategy(cfg, make_layout(cfg), rank, "cpu", model)


def run_steps(strategy, cfg, prompt_batch: int = 2, decode_after_step0: bool = False) -> dict:
    """A greedy decode, step 0 in detail, 3 more AdamW steps and an evaluation (and with
    `decode_after_step0` a second decode after step 0, where balancing has moved experts)."""
    comm_timer().reset()
    strategy.train(True)
    params = [p for _, p in strategy.named_parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2),
                            weight_decay=cfg.train.weight_decay)
    batches = make_batches(cfg, STEPS + 1)
    # Greedy decoding from the initial weights: after training, fp32 rounding that Adam
    # amplifies can flip a near-tie between two logits; at step 0 the strategies agree to ~1e-7.
    gen = strategy.generate(make_prompt(cfg, prompt_batch), NEW_TOKENS)
    result: dict = {"losses": [], "tokens": gen.tokens, "token_s": gen.token_s}
    for step, batch in enumerate(batches[:STEPS]):
        stats = strategy.forward_backward(batch)
        if step == 0:
            result.update(loss=stats.loss, lb=stats.lb_loss, z=stats.z_loss, tpe=stats.tokens_per_expert,
                          dropped=stats.dropped, n_tokens=stats.n_tokens, n_micro=stats.n_micro,
                          grads={n: p.grad.detach().clone() for n, p in strategy.named_parameters()})
            split = getattr(strategy, "head_split", None)  # ma_sep's head rows this rank computes at step 0
            if split is not None:
                result["head_rows"] = split.owned(strategy.head_weight())[:, 0].clone()
        else:
            result["losses"].append(stats.loss)
        result.setdefault("grad_norms", []).append(strategy.clip_gradients(1.0))
        opt.step()
        strategy.after_step(step, opt)
        opt.zero_grad(set_to_none=True)
        if step == 0 and decode_after_step0:
            result["tokens_after_step0"] = strategy.generate(make_prompt(cfg, prompt_batch), NEW_TOKENS).tokens
    result["eval"] = strategy.evaluate(batches[STEPS])
    result["comm"] = comm_timer().totals()
    return result


def parity_rank(rank: int, world: int, cases: list) -> list:
    """`run_steps` for each (overrides, prompt batch) case, with what the checks need to know
    about this rank."""
    out = []
    for overrides, prompt_batch in cases:
        cfg = make_cfg(overrides, world)
        strategy = build(cfg, rank)
        result = run_steps(strategy, cfg, prompt_batch, moves_experts(overrides))
        result["checkpoint_keys"] = {n: strategy.checkpoint_key(n) for n, _ in strategy.named_parameters()}
        result["schedule"] = getattr(strategy, "last_schedule", None)
        result["slot_of"] = getattr(strategy, "slot_of", None)
        out.append(result)
    return out


def model_overrides(overrides) -> tuple:
    """The overrides that change what is computed (the reference ignores the layout and balancing)."""
    return tuple(o for o in overrides if not o.startswith(("parallel.", "ma.")))


def moves_experts(overrides) -> bool:
    return "ma.rebalance=true" in overrides


# ma_sep's output head split between the groups; with SHUFFLED its cut is random from the start
# and moves at every step.
HEAD_SPLIT = ["ma.head_split=true"]


@functools.lru_cache(maxsize=None)
def reference(overrides: tuple, prompt_batch: int = 2, decode_after_step0: bool = False) -> dict:
    cfg = make_cfg(list(overrides) + ["parallel.strategy=single"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend with the ranks' processes
    try:
        return run_steps(build(cfg, 0), cfg, prompt_batch, decode_after_step0)
    finally:
        torch.set_num_threads(threads)


def shard_of(cfg, layout, rank: int):
    """`shard(name, full)`: the part of the full tensor `rank` holds."""
    c, m = layout.coords(rank), cfg.model
    if layout.strategy == "ma_sep":
        index, parts = (c["moe_index"], layout.moe_ranks) if c["role"] == "moe" else (c["head_shard"], layout.attn_tp)
        return lambda name, full: tp_shard(name, full, m, index, parts)
    if layout.strategy == "ep_dp":
        n = m.experts // layout.world_size
        return lambda name, full: full[rank * n:(rank + 1) * n] if name.endswith(("w_up", "w_down")) else full
    return lambda name, full: tp_shard(name, full, m, c["tp"], layout.tp)  # tp = 1: the full tensor


def assert_parity(got: dict, ref: dict, shard) -> None:
    assert got["n_tokens"] == ref["n_tokens"] and got["n_micro"] == ref["n_micro"]
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert got["lb"] == pytest.approx(ref["lb"], rel=1e-5)
    assert got["z"] == pytest.approx(ref["z"], rel=1e-5)
    assert torch.equal(got["tpe"], ref["tpe"])
    assert got["dropped"] == ref["dropped"]
    assert set(got["grads"]) <= set(ref["grads"])
    for name, g in got["grads"].items():
        want = shard(name, ref["grads"][name])
        if name == "head.weight" and "head_rows" in got:  # rows other ranks compute are zero here
            want = want * got["head_rows"][:, None]
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6, msg=name)
    assert got["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-4)
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-4)
    assert got["eval"][1] == ref["eval"][1]
    assert got["eval"][0] == pytest.approx(ref["eval"][0], rel=1e-4)
    assert torch.equal(got["tokens"], ref["tokens"])
    if "tokens_after_step0" in ref:
        assert torch.equal(got["tokens_after_step0"], ref["tokens_after_step0"])
    assert len(got["token_s"]) == NEW_TOKENS - 1


def check_parity(results: list, overrides: list, prompt_batch: int = 2) -> None:
    """Every rank matches the reference on its share; together the ranks hold every parameter."""
    cfg = make_cfg(overrides, len(results))
    layout = make_layout(cfg)
    ref = reference(model_overrides(overrides), prompt_batch, moves_experts(overrides))
    if "model.capacity_factor=1.0" in overrides:
        assert ref["dropped"] > 0  # the capacity case really drops tokens
    covered = set()
    for rank, got in enumerate(results):
        assert_parity(got, ref, shard_of(cfg, layout, rank))
        covered |= set(got["grads"])
    assert covered == set(ref["grads"])
    if "ma.head_split=true" in overrides:  # some rank computes every head row, and both groups some
        rows = torch.stack([got["head_rows"] for got in results])
        assert rows.any(0).all() and rows[len(layout.attention_ranks):].any()


# ------------------------------------------------------------------ the trainer


def trainer_run(rank: int, world: int, overrides: list[str], ckpt_dir: str) -> dict:
    """The strategy-blind trainer: 4 straight steps, and 2 steps + checkpoint + resume + 2 steps
    (dropout on, so the RNG streams must survive the checkpoint too)."""
    from masep.runtime.trainer import Trainer

    cfg = make_cfg(overrides, world)
    batches = make_batches(cfg, 4)
    straight = Trainer(cfg, rank)
    rows = [straight.train_step(b) for b in batches]
    del straight
    first = Trainer(cfg, rank)
    losses = [first.train_step(b)["loss"] for b in batches[:2]]
    first.save(Path(ckpt_dir))
    del first
    resumed = Trainer(cfg, rank)
    start = resumed.resume(Path(ckpt_dir))
    losses += [resumed.train_step(b)["loss"] for b in batches[start:]]
    return {"rows": rows, "resumed_losses": losses, "resumed_at": start,
            "slot_of": getattr(resumed.strategy, "slot_of", None)}


def check_trainer_run(results: list, comm_used) -> None:
    """Every rank reports the same global losses; the resumed run repeats them bit for bit;
    the step rows carry time for exactly the communication kinds the strategy uses (`comm_used`:
    a set, or a function of the rank giving one)."""
    want = [row["loss"] for row in results[0]["rows"]]
    assert want[0] == pytest.approx(math.log(1000), rel=0.05)  # near uniform at init
    for rank, res in enumerate(results):
        used = comm_used(rank) if callable(comm_used) else comm_used
        assert [row["loss"] for row in res["rows"]] == want
        assert res["resumed_at"] == 2
        assert res["resumed_losses"] == want
        for row in res["rows"]:
            for kind in ("attn_allreduce", "moe_dispatch", "grad_sync", "p2p"):
                assert (row[f"comm_{kind}_s"] > 0) == (kind in used), (kind, row)


# ------------------------------------------------------------------ a rank dies mid-step


def dying_rank(rank: int, world: int, phases: list, marker_dir: str) -> list:
    """Per phase (overrides, bad rank): rank `bad` raises inside layer 1's MoE, then stays alive
    without joining any collective (like a hung peer) until the others have given up; they must
    fail within the timeout. The strategies' own groups time out; the default group (long
    timeout) lines the ranks up for the next phase."""
    outcomes = []
    for phase, (overrides, bad) in enumerate(phases):
        cfg = make_cfg(overrides, world)
        torch.distributed.barrier()  # start together: group creation waits at most the timeout
        strategy = build(cfg, rank)
        strategy.train(True)
        if rank == bad:
            def fail(module, args):
                raise RuntimeError("injected failure")
            dict(strategy.modules()[0].named_modules())["blocks.1.moe"].register_forward_pre_hook(fail)
        t0 = time.monotonic()
        try:
            strategy.forward_backward(make_batches(cfg, 1)[0])
            outcome = {"error": None}
        except Exception as e:  # noqa: BLE001 - the test inspects it
            outcome = {"error": type(e).__name__, "message": str(e)}
        outcome["elapsed"] = time.monotonic() - t0
        markers = Path(marker_dir)
        if rank == bad:
            deadline = time.monotonic() + 90
            while len(list(markers.glob(f"done-{phase}-*"))) < world - 1 and time.monotonic() < deadline:
                time.sleep(0.1)
        else:
            (markers / f"done-{phase}-{rank}").touch()
        outcomes.append(outcome)
    return outcomes
