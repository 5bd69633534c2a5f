"""The launcher's watch on a live SLURM cluster: a stopped rank ends its job within
parallel.timeout_s plus a few seconds, naming the rank; the cancel reaches every task (scancel).

The one-node test cluster runs the tasks on this host, so the test stops a rank by its pid
(from the rank's heartbeat file), as an operator or a frozen node would.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import cloudpickle
import pytest

from masep.config import load_config
from masep.launch import LaunchError, RankEntry, heartbeat_path, launch
from masep.runtime.distributed import init_distributed
from test_faults import tokens, train  # noqa: F401 - the fixture and the `masep train` runner

cloudpickle.register_pickle_by_value(sys.modules[__name__])

TIMEOUT_S = 10  # parallel.timeout_s of the job


class AllReduceForever(RankEntry):
    """Ranks that keep all-reducing (each a collective every 0.2 s) until stopped."""

    def __call__(self):
        import torch
        import torch.distributed as dist

        init_distributed(timeout_s=TIMEOUT_S)
        t = torch.ones(1)
        while True:
            dist.all_reduce(t)
            time.sleep(0.2)


def _sacct_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True,
                         text=True, timeout=20)
    return out.stdout.strip()


def _stop_rank_when_it_beats(folder, rank: int, found: dict, give_up: threading.Event) -> None:
    while not give_up.is_set():
        for path in folder.glob(f"*_{rank}_heartbeat.json"):
            try:
                info = json.loads(path.read_text())
            except ValueError:
                continue
            time.sleep(3)  # every rank inside its loop
            os.kill(info["pid"], signal.SIGSTOP)
            found.update(info, stopped_at=time.monotonic(), stopped_unix=time.time(), job_id=path.name.split("_")[0])
            return
        time.sleep(0.2)


@pytest.mark.timeout(240)
def test_slurm_stopped_rank_ends_the_job_and_is_named(slurm_cluster, slurm_job_name, tmp_path):
    if slurm_cluster.cpus < 2:
        pytest.skip(f"node {slurm_cluster.node} declares {slurm_cluster.cpus} CPUs; 2 needed")
    cfg = load_config("tiny", ["launch.executor=slurm", f"launch.partition={slurm_cluster.partition}",
                               "launch.time_min=5", "launch.wait_timeout_s=200",
                               f"parallel.timeout_s={TIMEOUT_S}", f"launch.log_dir={tmp_path}/logs"])
    folder = slurm_cluster.folder("stopped-rank")
    found: dict = {}
    give_up = threading.Event()
    stopper = threading.Thread(target=_stop_rank_when_it_beats, args=(folder, 1, found, give_up), daemon=True)
    stopper.start()
    try:
        with pytest.raises(LaunchError) as e:
            launch(AllReduceForever(), cfg, world_size=2, job_name=slurm_job_name, folder=folder)
        detected = time.monotonic() - found["stopped_at"]
    finally:
        give_up.set()
        if found:
            with_pid = found["pid"]
            subprocess.run(["scancel", found["job_id"]], capture_output=True, timeout=30, check=False)
            try:
                os.kill(with_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    msg = str(e.value)
    # The verdict comes within timeout_s + a few seconds; the launcher's return also waits for
    # the cancel confirmed through sacct (CANCELLED), which takes SLURM up to about 20 s more.
    assert e.value.detected_at - found["stopped_unix"] < TIMEOUT_S + 10, e.value.detected_at - found["stopped_unix"]
    assert detected < TIMEOUT_S + 30, detected
    assert f"(SLURM): rank 1 (pid {found['pid']} on {found['host']}) stopped making progress" in msg, msg
    assert "cancelled it (scancel; SLURM state CANCELLED" in msg, msg
    assert "\n" not in msg and msg.endswith("_1_log.err")
    job_id = found["job_id"]
    deadline = time.monotonic() + 60
    while not _sacct_state(job_id).startswith("CANCELLED") and time.monotonic() < deadline:
        time.sleep(1)
    assert _sacct_state(job_id).startswith("CANCELLED")
    assert heartbeat_path(folder, job_id, 0).exists()


@pytest.mark.timeout(240)
def test_slurm_cancel_reaches_tasks_that_ignore_sigint_and_sigterm(slurm_cluster, slurm_job_name, tmp_path):
    """At launch.wait_timeout_s the job is cancelled; tasks that ignore SIGINT (and submitit's
    tasks bypass SIGTERM) still end: scancel's SIGKILL after KillWait."""
    cfg = load_config("tiny", ["launch.executor=slurm", f"launch.partition={slurm_cluster.partition}",
                               "launch.time_min=5", "launch.wait_timeout_s=30",
                               f"parallel.timeout_s={TIMEOUT_S}", f"launch.log_dir={tmp_path}/logs"])
    folder = slurm_cluster.folder("cancel")
    with pytest.raises(LaunchError, match=r"did not finish within launch.wait_timeout_s=30 s; "
                                          r"cancelled it \(scancel; SLURM state CANCELLED") as e:
        launch(IgnoreSigint(), cfg, world_size=2, job_name=slurm_job_name, folder=folder)
    job_id = str(e.value).split()[1]
    pids = [json.loads(heartbeat_path(folder, job_id, r).read_text())["pid"] for r in range(2)]
    deadline = time.monotonic() + 60
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(1)
    assert not any(_alive(pid) for pid in pids)


class IgnoreSigint(RankEntry):
    def __call__(self):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        init_distributed(timeout_s=TIMEOUT_S)
        while True:
            time.sleep(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(600)
def test_slurm_ma_sep_recovers_a_lost_rank_0_in_the_job(slurm_cluster, tmp_path, tokens):
    """Under SLURM too the launcher hosts ma.failover's rendezvous store: rank 0 (an attention
    rank) killed by pid from outside, the other ranks regroup and finish the run in the job,
    no batch lost or repeated."""
    import pyarrow.parquet as pq

    out = tmp_path / "runs" / "kill_rank0"
    # seed 3: rank 0 after step 2
    log = train(tmp_path, tokens, out, "launch.executor=slurm", f"launch.partition={slurm_cluster.partition}",
                "launch.time_min=10", "ma.failover=true", "model.expert_dropout=0.0", "launch.max_restarts=1",
                "train.global_batch=8", "fault.kind=kill_attention", "fault.seed=3", strategy="ma_sep", world=4)
    [row] = pq.read_table(out / "faults-rank0.parquet").to_pylist()
    assert row["target_ranks"] == "0" and row["step_injected"] == 2, row
    assert row["recovery_mode"] == "in_job" and row["restarts"] == 0 and "restarting" not in log, log[-3000:]
    assert row["batches_lost"] == 0 and row["batches_repeated"] == 0, row
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
