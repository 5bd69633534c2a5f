"""submitit on a real SLURM cluster: multi-task jobs, failures, time-limit requeue, cancellation.

Each test waits on its job with an explicit deadline and cancels it when the deadline passes,
so nothing hangs; the `slurm_job_name` fixture cancels whatever a test leaves behind.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import cloudpickle
import pytest
import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

# The job callables below live in this test module, which the job's Python cannot import:
# ship them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ------------------------------------------------------------------ helpers


def make_executor(cluster, job_name: str, **params) -> submitit.SlurmExecutor:
    executor = submitit.SlurmExecutor(folder=cluster.folder(job_name), max_num_timeout=3)
    # 5 minutes: submitit's USR2 warning comes 90 s before the limit, well after these short
    # jobs end (a job of 2 minutes or less would get it at slurmctld's first time-limit check).
    executor.update_parameters(partition=cluster.partition, job_name=job_name,
                               **{"time": 5, **params})
    return executor


def wait_done(job: submitit.Job, timeout_s: float) -> None:
    """Wait until submitit sees the job finished; past the deadline cancel it and fail."""
    deadline = time.monotonic() + timeout_s
    while not job.done(force_check=True):
        if time.monotonic() > deadline:
            job.cancel(check=False)
            pytest.fail(f"SLURM job {job.job_id} not finished within {timeout_s} s "
                        f"(state {job.state}); logs: {job.paths.stdout}, {job.paths.stderr}")
        time.sleep(1)


def sacct_fields(job_id: str, fields: str) -> list[list[str]]:
    """sacct rows (job and steps) of one job."""
    out = subprocess.run(["sacct", "-n", "-P", "-j", job_id, "-o", fields],
                         capture_output=True, text=True, timeout=20, check=True).stdout
    return [line.split("|") for line in out.splitlines() if line]


def sacct_state(job_id: str, want: str, timeout_s: float = 30) -> str:
    """The job's accounting state, waiting up to `timeout_s` for it to start with `want`.

    slurmctld hands records to slurmdbd asynchronously, so sacct may lag the job a little.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        rows = [r for r in sacct_fields(job_id, "JobID,State") if r[0] == job_id]
        state = rows[0][1] if rows else ""
        if state.startswith(want) or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


# ------------------------------------------------------------------ job callables


def describe_task() -> dict:
    env = submitit.JobEnvironment()
    return {"global_rank": env.global_rank, "local_rank": env.local_rank,
            "num_tasks": env.num_tasks, "job_id": env.job_id,
            "slurm_procid": int(os.environ["SLURM_PROCID"]), "pid": os.getpid()}


def fail_with(message: str) -> None:
    raise ValueError(message)


def sleep_after_marker(marker: str, seconds: float) -> str:
    write_json_atomic(Path(marker), {"pid": os.getpid()})
    time.sleep(seconds)
    return "slept to the end"


class CountUntilRequeued(submitit.helpers.Checkpointable):
    """Counts until SLURM's time-limit warning (USR2) arrives; checkpoint() saves the count to
    a file, submitit requeues the job, and the next run continues from the saved count."""

    def __call__(self, checkpoint_path: str, extra_steps: int) -> dict:
        path = Path(checkpoint_path)
        state = json.loads(path.read_text()) if path.exists() else {"counter": 0, "saved": [], "runs": []}
        state["runs"].append({"job_id": submitit.JobEnvironment().job_id,
                              "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
                              "start_counter": state["counter"]})
        self.state = state
        if len(state["runs"]) == 1:
            # First run: count until the signal handler checkpoints and requeues (it exits this
            # process); the job's one-minute limit ends it otherwise.
            while True:
                state["counter"] += 1
                time.sleep(0.05)
        for _ in range(extra_steps):
            state["counter"] += 1
        return state

    def checkpoint(self, checkpoint_path: str, extra_steps: int) -> submitit.helpers.DelayedSubmission:
        state = getattr(self, "state", None)
        if state is not None:  # None when the signal came before __call__ started
            state["saved"].append(state["counter"])
            write_json_atomic(Path(checkpoint_path), state)
        return super().checkpoint(checkpoint_path, extra_steps)


# ------------------------------------------------------------------ tests


@pytest.mark.timeout(120)
def test_four_tasks_get_distinct_ranks_and_a_slurm_job_id(slurm_cluster, slurm_job_name):
    if slurm_cluster.cpus < 4:
        pytest.skip(f"node {slurm_cluster.node} declares {slurm_cluster.cpus} CPUs; 4 needed")
    executor = make_executor(slurm_cluster, slurm_job_name, nodes=1, ntasks_per_node=4)
    job = executor.submit(describe_task)
    wait_done(job, timeout_s=90)

    results = job.results()
    assert [r["global_rank"] for r in results] == [0, 1, 2, 3]
    assert [r["slurm_procid"] for r in results] == [0, 1, 2, 3]
    assert [r["local_rank"] for r in results] == [0, 1, 2, 3]
    assert {r["num_tasks"] for r in results} == {4}
    assert len({r["pid"] for r in results}) == 4
    assert job.job_id.isdigit()
    assert {r["job_id"] for r in results} == {job.job_id}
    assert sacct_state(job.job_id, "COMPLETED") == "COMPLETED"
    steps = {row[0]: row[1] for row in sacct_fields(job.job_id, "JobID,NTasks")}
    assert steps[f"{job.job_id}.0"] == "4"  # the srun step ran the four tasks


@pytest.mark.timeout(120)
def test_failing_job_raises_with_its_error_and_log_path(slurm_cluster, slurm_job_name):
    message = f"deliberate failure {uuid.uuid4().hex[:8]}"
    job = make_executor(slurm_cluster, slurm_job_name).submit(fail_with, message)
    wait_done(job, timeout_s=90)

    with pytest.raises(FailedJobError) as failure:
        job.result()
    text = str(failure.value)
    assert f"ValueError: {message}" in text
    assert str(job.paths.stderr) in text
    assert message in job.paths.stderr.read_text()
    assert sacct_state(job.job_id, "FAILED") == "FAILED"


@pytest.mark.timeout(240)
def test_time_limit_requeues_and_resumes_from_checkpoint(slurm_cluster, slurm_job_name):
    checkpoint = slurm_cluster.folder("checkpoint") / "state.json"
    # --time=1 (the smallest limit) with the USR2 warning due 45 s before it: slurmctld checks
    # limits every 30 s, so the warning reaches the first run within about 30 s of its start.
    executor = make_executor(slurm_cluster, slurm_job_name, time=1, signal_delay_s=45)
    job = executor.submit(CountUntilRequeued(), str(checkpoint), 5)
    wait_done(job, timeout_s=210)

    state = job.result()
    runs = state["runs"]
    assert len(runs) >= 2, state
    assert runs[0]["start_counter"] == 0
    assert state["saved"][0] > 0  # the first run counted, then saved on the warning
    # Each requeued run started from the count the previous run saved, not from zero.
    assert [r["start_counter"] for r in runs[1:]] == state["saved"][: len(runs) - 1]
    assert state["counter"] == runs[-1]["start_counter"] + 5
    assert {r["job_id"] for r in runs} == {job.job_id}  # requeued, not resubmitted
    assert [r["restart_count"] for r in runs] == list(range(len(runs)))
    assert json.loads(checkpoint.read_text())["saved"] == state["saved"]
    # It was SLURM's time-limit warning that stopped the first run (both runs log to this file).
    assert "Caught signal SIGUSR2" in job.paths.stderr.read_text()
    assert sacct_state(job.job_id, "COMPLETED") == "COMPLETED"


@pytest.mark.timeout(120)
def test_scancel_makes_result_raise_cancelled(slurm_cluster, slurm_job_name):
    marker = slurm_cluster.folder("marker") / "started.json"
    job = make_executor(slurm_cluster, slurm_job_name).submit(sleep_after_marker, str(marker), 300)
    deadline = time.monotonic() + 60
    while not marker.exists():
        if time.monotonic() > deadline:
            job.cancel(check=False)
            pytest.fail(f"SLURM job {job.job_id} did not start within 60 s (state {job.state})")
        time.sleep(0.5)
    task_pid = json.loads(marker.read_text())["pid"]

    subprocess.run(["scancel", job.job_id], check=True, timeout=30)
    wait_done(job, timeout_s=60)

    # No result file will come; do not wait submitit's default 15 s grace for a slow filesystem.
    job._results_timeout_s = 1
    with pytest.raises(UncompletedJobError) as failure:
        job.result()
    assert "CANCELLED" in str(failure.value)
    assert sacct_state(job.job_id, "CANCELLED").startswith("CANCELLED")
    # The task itself is gone (SIGTERM, then SIGKILL after KillWait).
    deadline = time.monotonic() + 30
    while Path(f"/proc/{task_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not Path(f"/proc/{task_pid}").exists()
