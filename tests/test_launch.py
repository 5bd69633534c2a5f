"""masep.launch: submitit executors and torch.distributed setup, on CPU ranks over gloo."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import cloudpickle
import pytest
import submitit

from masep.config import load_config
from masep.launch import LaunchError, RankEntry, executor_parameters, launch
from helpers import AllReduceRanks, FailOnRank, Sleep

# The entries below live in this test module, which the task processes cannot import:
# ship them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class SleepUntilRequeued(RankEntry):
    def __call__(self):
        if self.resume:
            return "resumed"
        time.sleep(60)
        return "never requeued"


def _cfg(tmp_path, *overrides):
    return load_config("tiny", [f"launch.log_dir={tmp_path}/logs", "launch.wait_timeout_s=90",
                                *overrides])


def test_local_all_reduce_over_gloo(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    results = launch(AllReduceRanks(), cfg, world_size=3, job_name="allreduce", folder=tmp_path / "job")
    assert [r["rank"] for r in results] == [0, 1, 2]
    assert all(r["world"] == 3 and r["sum"] == 3.0 and r["device"] == "cpu" for r in results)
    assert len({r["job_id"] for r in results}) == 1 and results[0]["job_id"]
    assert all(r["slurm_job_id"] is None for r in results)
    assert f"submitted job {results[0]['job_id']}" in capsys.readouterr().out


def test_failing_task_raises_with_its_logs(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(LaunchError) as e:
        launch(FailOnRank(1), cfg, world_size=2, job_name="fail", folder=tmp_path / "job")
    msg = str(e.value)
    assert "\n" not in msg and "rank 1 failed: ValueError: boom from rank 1" in msg
    err_log = msg.split("log: ")[1]
    assert os.path.exists(err_log) and "boom from rank 1" in open(err_log).read()


def test_wait_timeout_cancels_the_job(tmp_path):
    cfg = _cfg(tmp_path, "launch.wait_timeout_s=1.5")
    start = time.monotonic()
    # SIGINT first; on a loaded machine the task may take longer than the grace to stop (SIGTERM then)
    with pytest.raises(LaunchError, match=r"did not finish within launch.wait_timeout_s=1.5 s; cancelled it \(SIG(INT|TERM)"):
        launch(Sleep(120), cfg, world_size=1, job_name="slow", folder=tmp_path / "job")
    assert time.monotonic() - start < 20


def test_a_slurm_job_cancelled_while_its_ranks_finish_fails_by_its_final_state(tmp_path, monkeypatch):
    """scancel's kill-wait can let every rank finish: submitit's cached state (RUNNING) predates the
    cancel, so the verdict reads SLURM afresh, waiting for the job's end, and names the cancel."""
    from masep.launch import _collect

    job = submitit.SlurmJob(folder=tmp_path, job_id="7")
    monkeypatch.setattr(submitit.SlurmJob, "state", property(lambda self: "RUNNING"))
    fresh = iter(["RUNNING", "CANCELLED by 0"])  # sacct: the batch script ends a moment after the ranks
    job.get_info = lambda mode: {"State": next(fresh)} if mode == "force" else {"State": "RUNNING"}
    with pytest.raises(LaunchError, match=r"^job 7 \(SLURM\): cancelled outside masep \(SLURM state CANCELLED by 0\)"):
        _collect(job)


def test_local_timeout_requeues_a_checkpointable_entry(tmp_path):
    # The local executor signals the job `signal_delay_s` before its time limit; rank 0
    # checkpoints (RankEntry.checkpoint -> resume=True) and the controller starts it again.
    ex = submitit.LocalExecutor(tmp_path / "job", max_num_timeout=2)
    ex.update_parameters(tasks_per_node=1, timeout_min=0.2, signal_delay_s=9)
    job = ex.submit(SleepUntilRequeued())
    deadline = time.monotonic() + 60
    while not job.done() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert job.result() == "resumed"


def test_debug_executor_runs_in_process(tmp_path):
    cfg = _cfg(tmp_path, "launch.executor=debug")
    before = dict(os.environ)
    [r] = launch(AllReduceRanks(), cfg, world_size=1, job_name="dbg", folder=tmp_path / "job")
    assert (r["rank"], r["world"], r["sum"]) == (0, 1, 0.0)
    assert r["job_id"].startswith("DEBUG_")
    assert dict(os.environ) == before  # RANK, MASTER_* set for the entry are gone again
    with pytest.raises(LaunchError, match="launch.executor: debug .* world size 1 only, got 2"):
        launch(AllReduceRanks(), cfg, world_size=2, job_name="dbg", folder=tmp_path / "job")
    with pytest.raises(LaunchError, match="debug: .*failed: ValueError: boom from rank 0"):
        launch(FailOnRank(0), cfg, world_size=1, job_name="debug", folder=tmp_path / "job")


def test_slurm_parameters_come_from_config(tmp_path):
    cfg = _cfg(tmp_path, "launch.executor=slurm", "launch.nodes=2", "launch.gpus_per_node=4",
               "launch.partition=gpu", "launch.account=proj", "launch.qos=high", "launch.mem_gb=64",
               "launch.time_min=90", "launch.cpus_per_task=8",
               "launch.extra_sbatch={constraint: h100, exclusive: true}")
    p = executor_parameters(cfg.launch, 8, "train-tp")
    assert p == {"job_name": "train-tp", "nodes": 2, "ntasks_per_node": 4, "cpus_per_task": 8,
                 "time": 90, "gpus_per_node": 4, "partition": "gpu", "account": "proj",
                 "qos": "high", "mem": "64G",
                 "additional_parameters": {"constraint": "h100", "exclusive": True}}
    # The parameters are ones submitit's SlurmExecutor accepts, and end up in the sbatch file.
    from submitit.slurm.slurm import _make_sbatch_string

    text = _make_sbatch_string(command="x", folder=str(tmp_path), **p)
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --qos=high",
                 "#SBATCH --mem=64G", "#SBATCH --time=90", "#SBATCH --constraint=h100",
                 "#SBATCH --exclusive"):
        assert line in text, line
    with pytest.raises(LaunchError, match="launch.nodes: world size 6 does not split evenly over 4"):
        executor_parameters(load_config("tiny", ["launch.executor=slurm", "launch.nodes=4"]).launch, 6, "x")


def test_local_parameters_set_the_time_limit():
    p = executor_parameters(load_config("tiny", ["launch.time_min=30"]).launch, 4, "x")
    assert p == {"tasks_per_node": 4, "nodes": 1, "gpus_per_node": 0, "timeout_min": 30}


def test_single_process_without_any_environment():
    code = textwrap.dedent("""
        import os, torch, torch.distributed as dist
        from masep.runtime.distributed import init_distributed, shutdown_distributed
        for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            assert k not in os.environ
        info = init_distributed(10)
        t = torch.ones(1); dist.all_reduce(t)
        print(info.rank, info.world_size, info.local_rank, info.device, info.backend, t.item())
        shutdown_distributed()
    """)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SUBMITIT_", "SLURM_")) and k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "1", "0", "cpu", "gloo", "1.0"]


def test_torchrun_environment_fallback():
    code = textwrap.dedent("""
        import torch, torch.distributed as dist
        from masep.runtime.distributed import init_distributed, shutdown_distributed
        info = init_distributed(30)
        t = torch.tensor([10.0 ** info.rank]); dist.all_reduce(t)
        print(info.rank, info.world_size, t.item(), info.job_id)
        shutdown_distributed()
    """)
    from masep.launch import _free_port

    port = _free_port()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SUBMITIT_", "SLURM_"))}
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    assert [o[0].split() for o in outs] == [["0", "2", "11.0", "None"], ["1", "2", "11.0", "None"]]
