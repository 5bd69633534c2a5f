"""ma_sep's in-job recovery (`ma.failover`, masep.parallel.regroup): a rank killed by pid from
outside, the survivors regroup and training goes on with global-batch semantics intact.

Rank functions live at module level: spawned ranks import them by this module's name."""
from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist

from masep.parallel.comm import new_group_containing
from masep.parallel.regroup import Membership
from masep.testing import run_ranks
from parity import DROPLESS, SHUFFLED, ma_sep, make_batches, make_cfg
from test_faults import tokens, train  # noqa: F401 - the fixture and the `masep train` runner

WAIT = timedelta(seconds=300)


def kill_when(key: str, *victims: int):
    """An injector: SIGKILL ranks `victims` by pid as soon as the store holds `key`."""
    def inject(store, pids):  # the store the parent hosts: ranks set keys through `_signal`
        deadline = time.monotonic() + WAIT.total_seconds()
        while not store.check([key]) and time.monotonic() < deadline:
            time.sleep(0.01)
        for v in victims:
            os.kill(pids[v], signal.SIGKILL)
    return inject


def _signal(key: str) -> None:
    """Set `key` where the injector looks (the hosted store, beneath the default group's prefix)."""
    dist.distributed_c10d._get_default_store().underlying_store.set(key, "1")


# ------------------------------------------------------------------ the regroup itself


def regroup_rank(rank, world, rounds):
    store = dist.distributed_c10d._get_default_store()
    members = Membership(store, rank, world, stale_s=0.5)
    timeout = timedelta(seconds=10)  # a rank not talking to the lost one detects it by this timeout
    group = new_group_containing(rank, [list(range(world))], timeout)
    i = 0
    try:
        while True:  # all-reduces until the victim is gone
            dist.all_reduce(torch.ones(1), group=group)
            i += 1
            if i == rounds and rank == 0:
                _signal("rounds_done")
            time.sleep(0.01)
    except RuntimeError:
        t_detect = time.perf_counter()
    dist.destroy_process_group(group)
    alive, steps = members.regroup(i)
    group = new_group_containing(rank, [alive], timeout)
    t = torch.ones(1)
    dist.all_reduce(t, group=group)
    members.stop()
    return {"members": alive, "sum": float(t), "regroup_s": time.perf_counter() - t_detect, "rounds": i}


def test_survivors_regroup_after_a_kill():
    out = run_ranks(4, regroup_rank, 5, injector=kill_when("rounds_done", 2))
    assert out[2] is None
    for r in (0, 1, 3):
        assert out[r]["members"] == [0, 1, 3]
        assert out[r]["sum"] == 3.0  # a working group of the three survivors
        assert out[r]["rounds"] >= 5
        assert out[r]["regroup_s"] < 20  # detection (at most the group's timeout) and the regroup


# ------------------------------------------------------------------ attention replicas lost

STEPS, KILL_STEP = 5, 2
FAILOVER = DROPLESS + ["ma.failover=true", "ma.failover_stale_s=0.5", "parallel.timeout_s=10"]


def replicas_lost_rank(rank, world, layout, victims, extra):
    from masep.runtime.trainer import Trainer

    cfg = make_cfg(ma_sep(*layout) + FAILOVER + extra, world)
    trainer = Trainer(cfg, rank)
    losses = []
    for step, batch in enumerate(make_batches(cfg, STEPS)):
        if rank == victims[0] and step == KILL_STEP:
            _signal("victim_in_step")  # the injector kills the victims from outside
        losses.append(trainer.train_step(batch)["loss"])
    trainer.failover.stop()
    return {"losses": losses, "events": trainer.failover.events, "steps": trainer.step}


@pytest.fixture(scope="module")
def single_losses():
    """The reference: the global batch's loss does not depend on who computes it, so after the
    survivors take the lost replicas' micro-batches the schedule's losses are single's."""
    from masep.runtime.trainer import Trainer

    cfg = make_cfg(list(DROPLESS) + ["parallel.strategy=single"])
    single = Trainer(cfg, 0)
    return [single.train_step(b)["loss"] for b in make_batches(cfg, STEPS)]


@pytest.mark.parametrize("layout, victims, extra", [
    ((1, 2, 2, 2), (1,), []),  # 2 attention replicas + 2 MoE ranks: replica 1 lost
    ((1, 4, 4, 1), (1, 2), []),  # 4 attention replicas + 4 MoE ranks: 2 of 4 lost at once
    # experts moved to a random placement at the sync point after step 2, which follows the regroup
    ((1, 2, 2, 2), (1,), SHUFFLED + ["ma.rebalance_every=3"]),
], ids=["1_of_2", "2_of_4", "1_of_2_rebalancing"])
def test_attention_replicas_lost_training_goes_on(layout, victims, extra, single_losses):
    world = layout[0] * layout[1] + layout[2]
    out = run_ranks(world, replicas_lost_rank, layout, victims, extra,
                    injector=kill_when("victim_in_step", *victims))
    survivors = [r for r in range(world) if r not in victims]
    assert all(out[v] is None for v in victims)
    for r in survivors:
        res = out[r]
        assert res["steps"] == STEPS
        # every step's loss is single's on the same batch: none skipped, none repeated, the
        # lost replicas' share taken by the survivors (a batch lost or counted twice shifts them)
        assert res["losses"] == pytest.approx(single_losses, rel=1e-5, abs=1e-5), r
        assert sorted(v for e in res["events"] for v in e["rank_lost"]) == list(victims)
        assert res["events"][-1]["survivors"] == survivors
        # seen in step KILL_STEP (redone), or at the end of the one before (complete everywhere)
        assert all(e["steps_redone"] in (0, 1) and e["step"] + 1 - e["steps_redone"] >= KILL_STEP
                   for e in res["events"])
        assert all(0 < e["regroup_s"] < 30 for e in res["events"])


# ------------------------------------------------------------------ MoE ranks lost


def moe_lost_rank(rank, world, layout, victims, ckpt):
    from masep.runtime.trainer import Trainer

    cfg = make_cfg(ma_sep(*layout) + FAILOVER, world)
    trainer = Trainer(cfg, rank)
    losses = []
    for step, batch in enumerate(make_batches(cfg, STEPS)):
        if rank == victims[0] and step == KILL_STEP:
            _signal("victim_in_step")
        losses.append(trainer.train_step(batch)["loss"])
    trainer.save(ckpt)  # the taken-over experts under their own shards' keys
    trainer.failover.stop()
    return {"losses": losses, "events": trainer.failover.events, "steps": trainer.step}


def resume_rank(rank, world, layout, ckpt):
    from masep.runtime.trainer import Trainer

    cfg = make_cfg(ma_sep(*layout) + DROPLESS, world)
    trainer = Trainer(cfg, rank)
    assert trainer.resume(ckpt) == STEPS
    return trainer.train_step(make_batches(cfg, STEPS + 1)[STEPS])["loss"]


@pytest.mark.parametrize("layout, victims", [
    ((1, 2, 2, 2), (2,)),  # 2 attention replicas + 2 MoE ranks: MoE rank 0 lost, rank 3 takes its experts
    ((1, 2, 4, 2), (5, 1)),  # 2 replicas + 4 MoE ranks: a MoE rank and an attention replica at once
], ids=["moe_1_of_2", "moe_and_replica"])
def test_moe_rank_lost_its_experts_are_taken_over(layout, victims, tmp_path):
    """A lost MoE rank's experts are taken over by the next MoE rank from its copy: every step's
    loss is single's (no batch lost or repeated, the copy current), and a checkpoint written
    after the take-over resumes in the full layout as single goes on."""
    from masep.runtime.trainer import Trainer

    world = layout[0] * layout[1] + layout[2]
    ckpt = tmp_path / "ckpt"
    out = run_ranks(world, moe_lost_rank, layout, victims, ckpt, injector=kill_when("victim_in_step", *victims))
    cfg = make_cfg(list(DROPLESS) + ["parallel.strategy=single"])
    single = Trainer(cfg, 0)
    reference = [single.train_step(b)["loss"] for b in make_batches(cfg, STEPS + 1)]
    survivors = [r for r in range(world) if r not in victims]
    for r in survivors:
        res = out[r]
        assert res["steps"] == STEPS
        assert res["losses"] == pytest.approx(reference[:STEPS], rel=1e-5, abs=1e-5), r
        assert sorted(v for e in res["events"] for v in e["rank_lost"]) == sorted(victims)
        assert res["events"][-1]["survivors"] == survivors
    resumed = run_ranks(world, resume_rank, layout, ckpt)
    assert resumed == pytest.approx([reference[STEPS]] * world, rel=1e-5, abs=1e-5)


# ------------------------------------------------------------------ a fault trial, end to end

E2E = ["ma.failover=true", "model.expert_dropout=0.0", "launch.max_restarts=1", "train.global_batch=8"]


@pytest.fixture(scope="module")
def e2e_reference(tmp_path_factory, tokens):
    tmp = tmp_path_factory.mktemp("e2e_reference")
    train(tmp, tokens, tmp / "runs" / "reference", *E2E, strategy="ma_sep", world=4)
    return tmp / "runs" / "reference"


@pytest.mark.slow
@pytest.mark.parametrize("kind, victim", [("kill_attention", 1), ("kill_moe", 3), ("stop", 1), ("kill_checkpoint", 1)])
def test_fault_trial_recovers_in_the_job(tmp_path, tokens, e2e_reference, kind, victim):
    """`masep train` with a fault on ma_sep (2 attention + 2 MoE ranks): the launcher's injector
    SIGKILLs (SIGSTOPs) an attention rank (its replica is dropped; kill_checkpoint: while the
    checkpoint is written) or a MoE rank (its experts are taken over) by pid; the run finishes in
    the job, its faults row has the detection and recovery times from the recovery rows, and its
    batches and final loss are the uninterrupted reference's."""
    reference = e2e_reference
    out = tmp_path / "runs" / kind
    # seed 5: the victim after step 5 (kill_checkpoint: while writing the checkpoint after it)
    log = train(tmp_path, tokens, out, *E2E, f"fault.kind={kind}", "fault.seed=5",
                f"fault.reference={reference}", strategy="ma_sep", world=4)
    [row] = pq.read_table(out / "faults-rank0.parquet").to_pylist()
    assert row["target_ranks"] == str(victim) and row["step_injected"] == row["planned_step"] == 5
    assert row["recovery_mode"] == "in_job" and row["restarts"] == 0 and "restarting" not in log
    assert 0 < row["detection_s"] < row["recovery_s"] and row["steps_replayed"] in (0, 1)
    assert (row["batches_completed"], row["batches_lost"], row["batches_repeated"], row["batches_mismatched"]) == (8, 0, 0, 0)
    assert row["final_loss_abs_diff"] <= 1e-5
    steps = pq.read_table(out / "steps-rank0.parquet").to_pylist()
    ref = pq.read_table(reference / "steps-rank0.parquet").to_pylist()
    assert [r["step"] for r in steps] == list(range(8))
    assert [r["batch_crc32"] for r in steps] == [r["batch_crc32"] for r in ref]
    recovery = pq.read_table(out / "recovery-rank0.parquet").to_pylist()
    assert [(e["rank_lost"], e["survivors"]) for e in recovery] == [([victim], [r for r in range(4) if r != victim])]
    assert f"rank(s) {victim} after step 5: recovered in the job" in log
