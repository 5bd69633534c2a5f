"""Strategy `tp` against the single-rank reference: same losses, gradients, steps and tokens.

The harness here (`parity_rank`, `run_steps`, `reference`) is reused by test_parallel_ep_dp.py.
Rank functions live at module level so spawned ranks can import them.
"""
from __future__ import annotations

import functools
import importlib
import math
import time
from pathlib import Path

import pytest
import torch

from masep.config import load_config
from masep.model import build_model
from masep.parallel.layout import make_layout
from masep.parallel.single import SingleRank
from masep.parallel.sharding import is_tp_sharded, tp_shard
from masep.telemetry.timing import comm_timer
from masep.testing import run_ranks

TP = "masep.parallel.tp:TensorParallel"
BASE = ["data.seq_len=32", "train.global_batch=8", "train.micro_batch=2", "model.hidden=64", "model.layers=2",
        "model.heads=4", "model.experts=16", "model.expert_hidden=64", "model.vocab_size=1000",
        "model.vocab_pad_multiple=128", "model.dropout=0.0", "model.expert_dropout=0.0",
        "train.lr=0.01", "parallel.timeout_s=60"]
DROPLESS = ["model.capacity_factor=null"]
CAPACITY = ["model.capacity_factor=1.0"]
STEPS = 4  # step 0 compared in detail, then the losses of 3 more optimizer steps
NEW_TOKENS = 6


def make_cfg(overrides: list[str]):
    return load_config("tiny", BASE + overrides)


def make_batches(cfg, n: int) -> list:
    """Deterministic random global batches; some targets masked out."""
    from masep.parallel.base import GlobalBatch

    gen = torch.Generator().manual_seed(1234)
    G, T, V = cfg.train.global_batch, cfg.data.seq_len, cfg.model.vocab_size
    out = []
    for _ in range(n):
        inputs = torch.randint(0, V, (G, T), generator=gen)
        targets = torch.randint(0, V, (G, T), generator=gen)
        mask = (torch.rand(G, T, generator=gen) > 0.1).float()
        out.append(GlobalBatch(inputs, targets, mask))
    return out


def make_prompt(cfg) -> torch.Tensor:
    gen = torch.Generator().manual_seed(99)
    return torch.randint(0, cfg.model.vocab_size, (2, 8), generator=gen)


def run_steps(strategy, cfg) -> dict:
    """A greedy decode, step 0 in detail, 3 more AdamW steps and an evaluation."""
    comm_timer().reset()
    params = [p for _, p in strategy.named_parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2),
                            weight_decay=cfg.train.weight_decay)
    batches = make_batches(cfg, STEPS + 1)
    # Greedy decoding from the initial weights: after training, fp32 rounding that Adam
    # amplifies can flip a near-tie between two logits; at step 0 the strategies agree to ~1e-7.
    result: dict = {"losses": [], "tokens": strategy.generate(make_prompt(cfg), NEW_TOKENS).tokens}
    for step, batch in enumerate(batches[:STEPS]):
        stats = strategy.forward_backward(batch)
        if step == 0:
            result.update(loss=stats.loss, lb=stats.lb_loss, z=stats.z_loss, tpe=stats.tokens_per_expert,
                          dropped=stats.dropped, n_tokens=stats.n_tokens,
                          grads={n: p.grad.detach().clone() for n, p in strategy.named_parameters()})
        else:
            result["losses"].append(stats.loss)
        result.setdefault("grad_norms", []).append(strategy.clip_gradients(1.0))
        opt.step()
        opt.zero_grad(set_to_none=True)
    result["eval"] = strategy.evaluate(batches[STEPS])
    result["comm"] = comm_timer().totals()
    return result


def build(class_path: str, cfg, rank: int):
    module, cls = class_path.split(":")
    layout = make_layout(cfg)
    model = build_model(cfg.model, cfg.train.seed)
    torch.manual_seed(cfg.train.seed * 1000 + rank)  # per-rank streams, as the trainer seeds them
    return getattr(importlib.import_module(module), cls)(cfg, layout, rank, "cpu", model)


def trainer_run(rank: int, world: int, overrides: list[str], ckpt_dir: str) -> dict:
    """The strategy-blind trainer: 4 straight steps, and 2 steps + checkpoint + resume + 2 steps
    (dropout on, so the RNG streams must survive the checkpoint too)."""
    from masep.runtime.trainer import Trainer

    cfg = make_cfg(overrides + [f"parallel.world_size={world}"])
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
    return {"rows": rows, "resumed_losses": losses, "resumed_at": start}


def parity_rank(rank: int, world: int, cases: list, ckpt_root: str = "") -> list:
    """Each case: (class path, overrides, what): "steps" runs `run_steps`; "dropout" one
    training step with dropout on, returning the replicated parameters' gradients; "trainer"
    runs `trainer_run` (checkpoints under `ckpt_root`)."""
    out = []
    for i, (class_path, overrides, what) in enumerate(cases):
        if what == "trainer":
            out.append(trainer_run(rank, world, overrides, str(Path(ckpt_root) / f"case{i}")))
            continue
        cfg = make_cfg(overrides + [f"parallel.world_size={world}"])
        strategy = build(class_path, cfg, rank)
        strategy.train(True)
        if what == "steps":
            out.append(run_steps(strategy, cfg))
        else:
            strategy.forward_backward(make_batches(cfg, 1)[0])
            out.append({n: p.grad.clone() for n, p in strategy.named_parameters() if not is_tp_sharded(n)})
    return out


def check_trainer_run(results: list, comm_used: set) -> None:
    """Every rank reports the same global losses; the resumed run repeats them bit for bit;
    the step rows carry time for exactly the communication kinds the strategy uses."""
    want = [row["loss"] for row in results[0]["rows"]]
    assert want[0] == pytest.approx(math.log(1000), rel=0.05)  # near uniform at init
    for res in results:
        assert [row["loss"] for row in res["rows"]] == want
        assert res["resumed_at"] == 2
        assert res["resumed_losses"] == want
        for row in res["rows"]:
            for kind in ("attn_allreduce", "moe_dispatch", "grad_sync", "p2p"):
                assert (row[f"comm_{kind}_s"] > 0) == (kind in comm_used), (kind, row)


@functools.lru_cache(maxsize=None)
def reference(overrides: tuple) -> dict:
    cfg = make_cfg(list(overrides) + ["parallel.strategy=single", "parallel.world_size=1"])
    torch.manual_seed(0)
    strategy = SingleRank(cfg, make_layout(cfg), 0, "cpu", build_model(cfg.model, cfg.train.seed))
    strategy.train(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend with the ranks' processes
    try:
        return run_steps(strategy, cfg)
    finally:
        torch.set_num_threads(threads)


def assert_parity(got: dict, ref: dict, shard) -> None:
    """`shard(name, full)`: the part of the full tensor this rank holds."""
    assert got["n_tokens"] == ref["n_tokens"]
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert got["lb"] == pytest.approx(ref["lb"], rel=1e-5)
    assert got["z"] == pytest.approx(ref["z"], rel=1e-5)
    assert torch.equal(got["tpe"], ref["tpe"])
    assert got["dropped"] == ref["dropped"]
    assert set(got["grads"]) <= set(ref["grads"])
    for name, g in got["grads"].items():
        torch.testing.assert_close(g, shard(name, ref["grads"][name]), rtol=1e-4, atol=1e-6, msg=name)
    assert got["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-4)
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-4)
    assert got["eval"][1] == ref["eval"][1]
    assert got["eval"][0] == pytest.approx(ref["eval"][0], rel=1e-4)
    assert torch.equal(got["tokens"], ref["tokens"])


def model_overrides(overrides: list) -> tuple:
    """The overrides that change what is computed (the reference ignores the layout)."""
    return tuple(o for o in overrides if not o.startswith("parallel."))


def tp_parity_check(results: list, overrides: list, tp: int, case: int) -> None:
    cfg = make_cfg(overrides)
    ref = reference(model_overrides(overrides))
    covered = set()
    for rank, per_case in enumerate(results):
        got = per_case[case]
        tp_rank = rank % tp
        assert_parity(got, ref, lambda n, full: tp_shard(n, full, cfg.model, tp_rank, tp))
        covered |= set(got["grads"])
        assert got["comm"]["attn_allreduce"] > 0 and got["comm"]["moe_dispatch"] > 0
        assert (got["comm"]["grad_sync"] > 0) == (len(results) > tp)
    assert covered == set(ref["grads"])  # every parameter is held somewhere


# ------------------------------------------------------------------ world 4

CASES_4 = [
    (["parallel.strategy=tp", "parallel.tp=4"] + DROPLESS, 4),
    (["parallel.strategy=tp", "parallel.tp=4"] + CAPACITY, 4),
    (["parallel.strategy=tp", "parallel.tp=2"] + DROPLESS, 2),
    (["parallel.strategy=tp", "parallel.tp=2"] + CAPACITY, 2),
]


DROPOUT = ["parallel.strategy=tp", "parallel.tp=4", "model.dropout=0.2", "model.expert_dropout=0.2"] + DROPLESS


TRAINER = ["parallel.strategy=tp", "parallel.tp=2", "model.dropout=0.1", "model.expert_dropout=0.1"] + CAPACITY


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    cases = [(TP, o, "steps") for o, _ in CASES_4] + [(TP, DROPOUT, "dropout"), (TP, TRAINER, "trainer")]
    return run_ranks(4, parity_rank, cases, str(tmp_path_factory.mktemp("tp-checkpoints")), timeout_s=120)


@pytest.mark.parametrize("case", range(len(CASES_4)),
                         ids=["tp4-dropless", "tp4-capacity", "tp2dp2-dropless", "tp2dp2-capacity"])
def test_tp_matches_single_rank_on_4_ranks(world4, case):
    overrides, tp = CASES_4[case]
    tp_parity_check(world4, overrides, tp, case)


def test_tp4_dp2_matches_single_rank_on_8_ranks():
    overrides = ["parallel.strategy=tp", "parallel.tp=4"] + CAPACITY
    results = run_ranks(8, parity_rank, [(TP, overrides, "steps")], timeout_s=120)
    tp_parity_check(results, overrides, 4, 0)


def test_tp_ranks_draw_identical_replicated_dropout(world4):
    """Ranks start from different RNG streams (as the trainer seeds them) and experts drop out
    on their own rows; the residual dropout after them must still agree across the group, or
    the replicated parameters' gradients would differ from rank to rank."""
    grads = [per_case[len(CASES_4)] for per_case in world4]
    assert {"head.weight", "embed.weight", "blocks.1.moe.router.weight"} <= set(grads[0])
    for other in grads[1:]:
        for name, g in grads[0].items():
            assert torch.equal(other[name], g), name
    assert grads[0]["head.weight"].abs().sum() > 0


def test_tp_under_the_trainer_resumes_exactly(world4):
    check_trainer_run([per_case[len(CASES_4) + 1] for per_case in world4],
                      {"attn_allreduce", "moe_dispatch", "grad_sync"})


# ------------------------------------------------------------------ shards


def test_tp_shards_cover_each_parameter_exactly_once():
    cfg = make_cfg(["parallel.strategy=tp", "parallel.tp=2", "parallel.world_size=4"])
    for name, p in build_model(cfg.model, 0).named_parameters():
        ids = torch.arange(p.numel(), dtype=torch.float64).view(p.shape)
        if is_tp_sharded(name):
            parts = [tp_shard(name, ids, cfg.model, r, 2) for r in range(2)]
            assert all(x.numel() == p.numel() // 2 for x in parts), name
            assert torch.equal(torch.cat([x.reshape(-1) for x in parts]).sort().values, ids.reshape(-1)), name
        else:
            assert tp_shard(name, ids, cfg.model, 1, 2) is ids


# ------------------------------------------------------------------ a rank dies mid-step


def dying_rank(rank: int, world: int, phases: list, marker_dir: str) -> list:
    """Per phase (class path, overrides, bad rank): rank `bad` raises inside layer 1's MoE, then
    stays alive without joining any collective (like a hung peer) until the others have given
    up; they must fail within the timeout. The strategies' own groups time out; the default
    group (long timeout) lines the ranks up for the next phase."""
    outcomes = []
    for phase, (class_path, overrides, bad) in enumerate(phases):
        cfg = make_cfg(overrides + [f"parallel.world_size={world}"])
        torch.distributed.barrier()  # start together: group creation waits at most the timeout
        strategy = build(class_path, cfg, rank)
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


def check_dying_rank(tmp_path, phases: list, world: int, timeout: float) -> None:
    phases = [(c, o + [f"parallel.timeout_s={timeout}"], bad) for c, o, bad in phases]
    results = run_ranks(world, dying_rank, phases, str(tmp_path), timeout_s=120)
    for phase, (class_path, _, bad) in enumerate(phases):
        got = [r[phase] for r in results]
        assert got[bad]["error"] == "RuntimeError" and "injected failure" in got[bad]["message"]
        for rank, r in enumerate(got):
            if rank != bad:
                assert r["error"] is not None, f"{class_path}: rank {rank} finished a step its peer never joined"
                # A collective waited for the silent peer and gave up after the timeout (or saw
                # the connection of a peer that had given up a moment earlier close).
                assert "Timed out" in r["message"] or "Connection closed" in r["message"], (class_path, rank, r)
                assert r["elapsed"] < timeout + 30, (class_path, rank, r)
