"""ma_sep's in-job recovery (`ma.failover`, masep.parallel.regroup): a rank killed by pid from
outside, the survivors regroup and training goes on with global-batch semantics intact.

Rank functions live at module level: spawned ranks import them by this module's name."""
from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from masep.parallel.comm import new_group_containing
from masep.parallel.regroup import Membership
from masep.testing import run_ranks
from parity import DROPLESS, ma_sep, make_batches, make_cfg

WAIT = timedelta(seconds=300)


def kill_when(key: str, victim: int):
    """An injector: SIGKILL rank `victim` by pid as soon as the store holds `key`."""
    def inject(store, pids):  # the store the parent hosts: ranks set keys through `_signal`
        deadline = time.monotonic() + WAIT.total_seconds()
        while not store.check([key]) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(pids[victim], signal.SIGKILL)
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


# ------------------------------------------------------------------ an attention replica lost

STEPS, KILL_STEP, VICTIM = 5, 2, 1  # rank 1: replica 1's attention rank (attn_tp=1)
FAILOVER = ma_sep(1, 2, 2, 2) + DROPLESS + ["ma.failover=true", "ma.failover_stale_s=0.5", "parallel.timeout_s=10"]


def replica_lost_rank(rank, world):
    from masep.runtime.trainer import Trainer

    cfg = make_cfg(FAILOVER, world)
    trainer = Trainer(cfg, rank)
    losses = []
    for step, batch in enumerate(make_batches(cfg, STEPS)):
        if rank == VICTIM and step == KILL_STEP:
            _signal("victim_in_step")  # the injector kills it from outside
        losses.append(trainer.train_step(batch)["loss"])
    trainer.failover.stop()
    return {"losses": losses, "events": trainer.failover.events, "steps": trainer.step}


def test_attention_replica_lost_training_goes_on():
    from masep.runtime.trainer import Trainer

    out = run_ranks(4, replica_lost_rank, injector=kill_when("victim_in_step", VICTIM))
    assert out[VICTIM] is None
    cfg = make_cfg(list(DROPLESS) + ["parallel.strategy=single"])
    single = Trainer(cfg, 0)  # the global batch's loss does not depend on who computes it
    want = [single.train_step(b)["loss"] for b in make_batches(cfg, STEPS)]
    for r in (0, 2, 3):
        res = out[r]
        assert res["steps"] == STEPS  # every batch once: none skipped, none repeated
        assert res["losses"] == pytest.approx(want, rel=1e-5, abs=1e-5), r
        (event,) = res["events"]
        assert event["rank_lost"] == [VICTIM] and event["survivors"] == [0, 2, 3]
        assert event["step"] >= KILL_STEP
