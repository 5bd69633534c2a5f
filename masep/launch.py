"""Start the ranks of one job through submitit, and set up torch.distributed inside them.

* `launch(entry, cfg, world_size, job_name, folder)` runs in the `masep train` / `masep infer`
  process (a Snakemake job). It submits ONE submitit job of `world_size` tasks, prints the job
  id, waits (never longer than `cfg.launch.wait_timeout_s`) and returns the per-task results, or
  raises `LaunchError` carrying the failing task's error and the paths of its logs.
  Executors (`cfg.launch.executor`):
    - ``local``: submitit's LocalExecutor, N processes on this machine (CPU ranks over gloo);
    - ``slurm``: submitit's SlurmExecutor, nodes/tasks/GPUs/partition/account/qos/time/mem and
      extra ``#SBATCH`` flags from `cfg.launch`;
    - ``debug``: submitit's DebugExecutor, in this very process; world size 1 only.

* What runs inside each rank (`init_distributed`, `DistInfo`) lives in `masep.runtime.distributed`.

Requeue: `entry` should subclass `RankEntry` (a `submitit.helpers.Checkpointable`). When SLURM
(or the local executor) signals a timeout, rank 0's `entry.checkpoint()` resubmits a copy with
`resume=True`; the rank worker then starts from the newest checkpoint in its run folder. At most
`cfg.launch.max_requeues` requeues happen.
"""
from __future__ import annotations

import contextlib
import copy
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

# How often the waiting process looks at the job. SLURM states come from sacct, which submitit
# itself rate-limits; a job that ends without results (FAILED, CANCELLED, NODE_FAIL ...) counts
# as done and fails in _collect. Without accounting submitit sees UNKNOWN forever: the wait
# timeout is what ends that.
POLL_S = 0.5


class LaunchError(RuntimeError):
    """A job failed, timed out, or could not be submitted; the message names its logs."""


class RankEntry(Checkpointable):
    """Base class for what each rank runs: picklable, called once per task.

    `resume` is False on the first start and True after a requeue; the worker should always
    look for the newest checkpoint in its run folder anyway so that re-runs continue.
    """

    resume: bool = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        resumed = copy.copy(self)
        resumed.resume = True
        return DelayedSubmission(resumed, *args, **kwargs)


# ------------------------------------------------------------------ submitting


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def executor_parameters(launch_cfg, world_size: int, job_name: str) -> dict:
    """submitit parameters for one job of `world_size` tasks under `launch_cfg.executor`."""
    lc = launch_cfg
    if world_size < 1:
        raise LaunchError(f"parallel.world_size: must be positive, got {world_size}")
    if lc.executor == "debug":
        if world_size != 1:
            raise LaunchError(f"launch.executor: debug runs in this process and supports world size 1 "
                              f"only, got {world_size}; use local or slurm")
        return {}
    if lc.executor == "local":
        return {
            "tasks_per_node": world_size,
            "nodes": 1,
            "gpus_per_node": lc.gpus_per_node,
            # LocalExecutor kills tasks after timeout_min (2 minutes unless told otherwise)
            "timeout_min": lc.time_min,
        }
    if lc.executor == "slurm":
        if world_size % lc.nodes:
            raise LaunchError(f"launch.nodes: world size {world_size} does not split evenly over "
                              f"{lc.nodes} nodes")
        params: dict[str, Any] = {
            "job_name": job_name,
            "nodes": lc.nodes,
            "ntasks_per_node": world_size // lc.nodes,
            "cpus_per_task": lc.cpus_per_task,
            "time": lc.time_min,
        }
        if lc.gpus_per_node:
            params["gpus_per_node"] = lc.gpus_per_node
        for key in ("partition", "account", "qos"):
            if getattr(lc, key):
                params[key] = getattr(lc, key)
        if lc.mem_gb:
            params["mem"] = f"{lc.mem_gb}G"
        if lc.extra_sbatch:
            params["additional_parameters"] = dict(lc.extra_sbatch)
        return params
    raise LaunchError(f"launch.executor: must be local, slurm or debug, got {lc.executor!r}")


def make_executor(launch_cfg, world_size: int, job_name: str, folder: str | Path):
    params = executor_parameters(launch_cfg, world_size, job_name)
    folder = Path(folder)
    if launch_cfg.executor == "debug":
        return submitit.DebugExecutor(folder)
    if launch_cfg.executor == "local":
        ex = submitit.LocalExecutor(folder, max_num_timeout=launch_cfg.max_requeues)
    else:
        ex = submitit.SlurmExecutor(folder, max_num_timeout=launch_cfg.max_requeues)
    ex.update_parameters(**params)
    return ex


def _log_paths(job, task: int) -> str:
    paths = job.task(task).paths if job.num_tasks > 1 else job.paths
    return f"stdout: {paths.stdout}\n  stderr: {paths.stderr}"


def _describe(job) -> str:
    return f"job {job.job_id}" + (" (SLURM)" if isinstance(job, submitit.SlurmJob) else "")


def _wait(job, timeout_s: float) -> None:
    """Wait for the job to finish, at most `timeout_s`; cancel it and raise when it does not."""
    deadline = time.monotonic() + timeout_s
    while not job.done():
        if time.monotonic() > deadline:
            with contextlib.suppress(Exception):
                job.cancel(check=False)
            raise LaunchError(f"{_describe(job)} did not finish within launch.wait_timeout_s="
                              f"{timeout_s:g} s; cancelled it. Logs of task 0:\n  {_log_paths(job, 0)}")
        time.sleep(POLL_S)


def _collect(job) -> list:
    """Per-task results, or a LaunchError naming the first failed task and its logs."""
    results = []
    for task in range(job.num_tasks):
        sub = job.task(task) if job.num_tasks > 1 else job
        err = sub.exception()
        if err is not None:
            raise LaunchError(f"{_describe(job)} task {task} of {job.num_tasks} failed:\n{err}\n"
                              f"Logs:\n  {_log_paths(job, task)}")
        results.append(sub.result())
    return results


def launch(entry: Callable[[], Any], cfg, world_size: int, job_name: str,
           folder: str | Path) -> list:
    """Run `entry()` once in each of `world_size` tasks of one job; return their results by rank."""
    lc = cfg.launch
    ex = make_executor(lc, world_size, job_name, folder)
    if lc.executor == "debug":
        return _run_debug(ex, entry, job_name)
    # Hide the caller's SLURM/torchrun variables from the job (sbatch and the local executor
    # pass this process' environment on), and give local ranks a free rendezvous port.
    with submitit.helpers.clean_env():
        extra = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": _free_port()} if lc.executor == "local" else {}
        with submitit.helpers.environment_variables(**extra):
            try:
                job = ex.submit(entry)
            except Exception as e:  # sbatch refused, submitit missing binaries, ...
                raise LaunchError(f"{job_name}: submission to {lc.executor} failed: {e}") from e
    print(f"masep launch: {job_name}: submitted {_describe(job)} with {world_size} task(s) "
          f"on {lc.executor}; logs in {Path(folder).resolve()}", flush=True)
    _wait(job, lc.wait_timeout_s)
    results = _collect(job)
    print(f"masep launch: {job_name}: {_describe(job)} finished", flush=True)
    return results


def _run_debug(ex, entry, job_name: str) -> list:
    job = ex.submit(entry)
    print(f"masep launch: {job_name}: running {job.job_id} in-process (debug executor)", flush=True)
    # DebugJob.results() drops into pdb on an exception; exception() runs it without that.
    # The entry runs in this process: give back the environment it changes (RANK, MASTER_*...).
    saved = dict(os.environ)
    try:
        os.environ["SUBMITIT_DEBUG_JOB_ID"] = job.job_id
        err = job.exception()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    if err is not None:
        raise LaunchError(f"{job_name}: {job.job_id} failed: {type(err).__name__}: {err}") from err
    return job.results()
