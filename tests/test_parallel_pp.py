"""Pipeline parallelism (`pp`) against the single-rank reference, on CPU gloo ranks.

Each parity run builds the same model (same seed) on every rank, runs one step and compares the
step statistics and every local gradient with SingleRank's, then 3 AdamW steps (losses), an
evaluation and greedy generation.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from masep.config import load_config
from masep.model import build_model
from masep.parallel.base import GlobalBatch
from masep.parallel.layout import make_layout
from masep.parallel.single import SingleRank
from masep.testing import run_ranks

SEED = 7
BASE = ["model.vocab_size=500", "model.hidden=64", "model.heads=4", "model.experts=16",
        "model.expert_hidden=64", "model.dropout=0.0", "model.expert_dropout=0.0",
        "data.seq_len=32", "train.micro_batch=2"]
STEPS = 4  # step 0 (stats and gradients) + 3 further optimizer steps (losses)
PROMPT_LEN, NEW_TOKENS = 8, 6


def make_config(overrides: list[str]):
    return load_config("tiny", BASE + overrides)


def make_batches(cfg, n: int) -> list[GlobalBatch]:
    gen = torch.Generator().manual_seed(SEED + 1)
    G, T, V = cfg.train.global_batch, cfg.data.seq_len, cfg.model.vocab_size
    out = []
    for _ in range(n):
        ids = torch.randint(0, V, (G, T + 1), generator=gen)
        mask = torch.ones(G, T)
        mask[::3, T - 5:] = 0.0  # some padded targets: the loss divides by the valid count only
        out.append(GlobalBatch(ids[:, :-1], ids[:, 1:], mask))
    return out


def make_prompt(cfg) -> torch.Tensor:
    gen = torch.Generator().manual_seed(SEED + 2)
    return torch.randint(0, cfg.model.vocab_size, (2, PROMPT_LEN), generator=gen)


def exercise(strategy, cfg) -> dict:
    """The parity protocol, identical for the reference and the strategy under test."""
    batches = make_batches(cfg, STEPS)
    params = [p for _, p in strategy.named_parameters()]
    opt = torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    result = {"losses": []}
    for step, batch in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        stats = strategy.forward_backward(batch)
        if step == 0:
            result["stats"] = stats
            result["grads"] = {n: p.grad.detach().clone() for n, p in strategy.named_parameters()
                               if p.grad is not None}
        result["losses"].append(stats.loss)
        norm = strategy.clip_gradients(1.0)
        if step == 0:
            result["grad_norm"] = norm
        opt.step()
    result["eval"] = strategy.evaluate(batches[0])
    result["tokens"] = strategy.generate(make_prompt(cfg), NEW_TOKENS).tokens
    return result


def reference(overrides: list[str]) -> dict:
    cfg = make_config(overrides + ["parallel.strategy=single", "parallel.world_size=1"])
    strategy = SingleRank(cfg, make_layout(cfg), 0, "cpu", build_model(cfg.model, SEED))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the ranks; a busy 2-core box slows threaded kernels badly
    try:
        return exercise(strategy, cfg)
    finally:
        torch.set_num_threads(threads)


def build_pp(rank: int, world: int, overrides: list[str]):
    from masep.parallel.pp import PipelineParallel

    cfg = make_config(overrides + ["parallel.strategy=pp", f"parallel.world_size={world}"])
    layout = make_layout(cfg)
    return PipelineParallel(cfg, layout, rank, "cpu", build_model(cfg.model, SEED)), cfg


def parity_run(rank: int, world: int, overrides: list[str]) -> dict:
    strategy, cfg = build_pp(rank, world, overrides)
    result = exercise(strategy, cfg)
    result["coords"] = strategy.layout.coords(rank)
    result["schedule"] = strategy.last_schedule
    return result


def failure_run(rank: int, world: int, overrides: list[str], bad_rank: int) -> dict:
    """Rank `bad_rank` raises in the forward of its second micro-batch and leaves; every rank
    reports the error it ended with and how long it took to get there."""
    strategy, cfg = build_pp(rank, world, overrides)
    if rank == bad_rank:
        calls = {"n": 0}

        def boom(module, args, output):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("injected failure")

        strategy.stage_module.blocks[str(strategy.layer_ids[0])].attn.register_forward_hook(boom)
    batch = make_batches(cfg, 1)[0]
    t0 = time.perf_counter()
    try:
        strategy.forward_backward(batch)
    except Exception as e:  # noqa: BLE001 - the test inspects what each rank saw
        return {"error": f"{type(e).__name__}: {e}", "elapsed": time.perf_counter() - t0}
    return {"error": None, "elapsed": time.perf_counter() - t0}


def trainer_run(rank: int, world: int, overrides: list[str], ckpt_dir: str) -> dict:
    """The strategy-blind trainer on `pp`: 4 straight steps, and 2 steps + checkpoint + resume +
    2 steps (expert dropout on, so each rank's RNG stream must survive the checkpoint too)."""
    from masep.runtime.trainer import Trainer

    cfg = make_config(overrides + ["parallel.strategy=pp", f"parallel.world_size={world}"])
    batches = make_batches(cfg, 4)
    straight = Trainer(cfg, rank)
    rows = [straight.train_step(b) for b in batches]
    del straight
    first = Trainer(cfg, rank)
    got = [first.train_step(b)["loss"] for b in batches[:2]]
    first.save(Path(ckpt_dir))
    del first
    resumed = Trainer(cfg, rank)
    start = resumed.resume(Path(ckpt_dir))
    got += [resumed.train_step(b)["loss"] for b in batches[start:]]
    return {"rows": rows, "resumed_losses": got, "resumed_at": start}


def pp_rank(rank: int, world: int, runs: dict[str, list[str]], trainer: list[str], ckpt_dir: str,
            failure: list[str], bad_rank: int) -> dict:
    """All parity runs, the trainer run, then the failure run last (it breaks the process
    group): one spawn of 4 processes pays torch's start-up once for the whole file."""
    out = {name: parity_run(rank, world, overrides) for name, overrides in runs.items()}
    out["trainer"] = trainer_run(rank, world, trainer, ckpt_dir)
    out["failure"] = failure_run(rank, world, failure, bad_rank)
    return out


def check_parity(ref: dict, results: list[dict], full_names: set[str]) -> None:
    seen = set()
    for res in results:
        st, rs = res["stats"], ref["stats"]
        assert st.loss == pytest.approx(rs.loss, rel=1e-5)
        assert st.lb_loss == pytest.approx(rs.lb_loss, rel=1e-5)
        assert st.z_loss == pytest.approx(rs.z_loss, rel=1e-5)
        assert st.n_tokens == rs.n_tokens and st.n_micro == rs.n_micro
        assert torch.equal(st.tokens_per_expert, rs.tokens_per_expert)
        assert st.dropped == rs.dropped
        assert res["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
        for name, g in res["grads"].items():
            torch.testing.assert_close(g, ref["grads"][name], rtol=1e-4, atol=1e-6, msg=name)
            seen.add(name)
        assert res["losses"] == pytest.approx(ref["losses"], rel=1e-4)
        assert res["eval"][0] == pytest.approx(ref["eval"][0], rel=1e-5)
        assert res["eval"][1] == ref["eval"][1]
        assert torch.equal(res["tokens"], ref["tokens"])
    # Together the stages hold every parameter of the model, under the model's names.
    assert seen == full_names


def full_names(overrides) -> set[str]:
    cfg = make_config(overrides + ["parallel.strategy=single", "parallel.world_size=1"])
    return {n for n, _ in build_model(cfg.model, SEED).named_parameters()}


RUNS = {
    # pp=2 x dp=2, 4 micro-batches per replica: warm-up, steady 1F1B and cool-down all occur.
    "pp2-dp2-dropless": ["parallel.pp=2", "train.global_batch=16", "model.capacity_factor=null"],
    # Capacity 1.0 drops tokens exactly as SingleRank does: each micro-batch is routed whole on
    # one stage, as on one rank. Tied embeddings: first and last stage sum the matrix's gradient.
    "pp2-dp2-capacity1-tied": ["parallel.pp=2", "train.global_batch=16", "model.capacity_factor=1.0",
                               "model.tie_embeddings=true"],
    # One layer per stage, one replica.
    "pp4-dp1-dropless": ["parallel.pp=4", "train.global_batch=8", "model.capacity_factor=null"],
}
TRAINER = ["parallel.pp=2", "train.global_batch=16", "model.expert_dropout=0.1"]
FAILURE_TIMEOUT_S = 5.0
FAILURE = ["parallel.pp=2", "train.global_batch=16", "model.capacity_factor=null",
           f"parallel.timeout_s={FAILURE_TIMEOUT_S}"]
BAD_RANK = 1  # stage 1 of replica 0


@pytest.fixture(scope="module")
def pp_results(tmp_path_factory) -> list[dict]:
    ckpt_dir = tmp_path_factory.mktemp("pp-checkpoint")
    return run_ranks(4, pp_rank, RUNS, TRAINER, str(ckpt_dir), FAILURE, BAD_RANK)


@pytest.mark.parametrize("run", list(RUNS))
def test_pp_matches_single_rank(run, pp_results):
    overrides = RUNS[run]
    ref = reference(overrides)
    results = [r[run] for r in pp_results]
    check_parity(ref, results, full_names(overrides))
    if "model.capacity_factor=1.0" in overrides:
        assert ref["stats"].dropped > 0  # the capacity case really drops tokens
    pp = int(next(o for o in overrides if o.startswith("parallel.pp=")).split("=")[1])
    for res in results:
        sched = res["schedule"]
        assert 0 < sched.compute_s < sched.wall_s
        assert sched.p2p_s > 0  # every stage has a neighbour
        # 1F1B, not all-forwards-then-all-backwards: stage s holds at most pp - s micro-batches.
        assert sched.max_in_flight == pp - res["coords"]["stage"]
    # Replicas of a stage hold identical gradients after the data-parallel sum.
    by_stage: dict[int, list[dict]] = {}
    for res in results:
        by_stage.setdefault(res["coords"]["stage"], []).append(res)
    for copies in by_stage.values():
        for other in copies[1:]:
            for name, g in copies[0]["grads"].items():
                assert torch.equal(g, other["grads"][name])


def test_pp2_dp4_matches_single_rank_on_8_ranks():
    """The 8-GPU layout (pp 2 x dp 4), with capacity drops, decoding included."""
    overrides = ["parallel.pp=2", "train.global_batch=32", "model.capacity_factor=1.0"]
    results = run_ranks(8, parity_run, overrides, timeout_s=180)
    check_parity(reference(overrides), results, full_names(overrides))
    assert {r["coords"]["dp"] for r in results} == {0, 1, 2, 3}


def test_pp_under_the_trainer_resumes_exactly(pp_results):
    results = [r["trainer"] for r in pp_results]
    want = [row["loss"] for row in results[0]["rows"]]
    assert want[0] == pytest.approx(math.log(500), rel=0.05)  # near uniform over the vocabulary at init
    for res in results:
        assert [row["loss"] for row in res["rows"]] == want  # the same global loss on every rank
        assert res["resumed_at"] == 2
        assert res["resumed_losses"] == want  # bit-identical after the checkpoint
        for row in res["rows"]:
            assert row["comm_p2p_s"] > 0 and row["comm_grad_sync_s"] > 0
            assert row["comm_attn_allreduce_s"] == 0 and row["comm_moe_dispatch_s"] == 0


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
