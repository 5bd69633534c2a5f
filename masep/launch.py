"""Start the ranks of one job through submitit, and set up torch.distributed inside them.

Two halves:

* `launch(entry, cfg, world_size, job_name, folder)` runs in the `masep train` / `masep infer`
  process (a Snakemake job). It submits ONE submitit job of `world_size` tasks, prints the job
  id, waits (never longer than `cfg.launch.wait_timeout_s`) and returns the per-task results, or
  raises `LaunchError` carrying the failing task's error and the paths of its logs.
  Executors (`cfg.launch.executor`):
    - ``local``: submitit's LocalExecutor, N processes on this machine (CPU ranks over gloo);
    - ``slurm``: submitit's SlurmExecutor, nodes/tasks/GPUs/partition/account/qos/time/mem and
      extra ``#SBATCH`` flags from `cfg.launch`;
    - ``debug``: submitit's DebugExecutor, in this very process; world size 1 only.

* `init_distributed(timeout_s)` runs in each rank. It reads the job environment submitit sets
  (falling back to torchrun's RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, and to a lone process when
  neither is there), initialises the default process group (gloo on CPU; NCCL for CUDA tensors
  plus gloo for CPU tensors on GPU) with the given collective timeout and returns a `DistInfo`.

Job ids reach the ranks through `DistInfo.job_id` / `DistInfo.slurm_job_id` (read from
`submitit.JobEnvironment()` in the rank: `slurm_job_id` is set only when the job runs under
SLURM). The run writer stores `DistInfo.slurm_job_id` as run.json's `slurm_job_id`;
`current_job()` gives the same pair to code that does not call `init_distributed`.

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
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

from masep.errors import ExpectedError

# How often the waiting process looks at the job. SLURM states come from sacct, which submitit
# itself rate-limits; a job that ends without results (FAILED, CANCELLED, NODE_FAIL ...) counts
# as done and fails in _collect. Without accounting submitit sees UNKNOWN forever: the wait
# timeout is what ends that.
POLL_S = 0.5


class LaunchError(ExpectedError, RuntimeError):
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


# ------------------------------------------------------------------ inside a rank


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: Any  # torch.device
    local_world_size: int = 1
    backend: str = "gloo"
    job_id: Optional[str] = None  # submitit's id of the job (SLURM job id, local pid, debug id)
    slurm_job_id: Optional[str] = None  # only when running under SLURM

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_job() -> tuple[Optional[str], Optional[str]]:
    """(submitit job id, SLURM job id) of the job this process runs in; Nones outside submitit."""
    try:
        env = submitit.JobEnvironment()
    except RuntimeError:
        return None, os.environ.get("SLURM_JOB_ID")
    return env.job_id, (env.job_id if env.cluster == "slurm" else None)


def _pick_device(local_rank: int, local_world_size: int):
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    # All of the node's GPUs visible: take ours by local rank. One visible: SLURM or the user
    # already narrowed CUDA_VISIBLE_DEVICES to this task's GPU.
    if count >= local_world_size:
        return torch.device("cuda", local_rank)
    if count == 1:
        return torch.device("cuda", 0)
    raise LaunchError(f"{count} GPUs visible to local rank {local_rank} of {local_world_size}: "
                      f"cannot tell which one is ours (CUDA_VISIBLE_DEVICES="
                      f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})")


def init_distributed(timeout_s: float) -> DistInfo:
    """Initialise torch.distributed for this rank from submitit's, torchrun's or no environment."""
    import torch
    import torch.distributed as dist

    job_id, slurm_job_id = current_job()
    if job_id is not None:
        job_env = submitit.JobEnvironment()
        if job_env.cluster in ("slurm", "local"):
            # A requeued job runs its tasks again under the same result files. Drop this task's
            # result of the interrupted run (the error of a rank whose rank 0 left to requeue),
            # or the waiting process, seeing every task's file, may collect it as this run's.
            with contextlib.suppress(FileNotFoundError):
                job_env.paths.result_pickle.unlink()
        tde = submitit.helpers.TorchDistributedEnvironment()
        if job_env.cluster in ("local", "debug"):
            tde.master_addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
        # Keep CUDA_VISIBLE_DEVICES as SLURM set it: export() would replace it by the local rank,
        # which names the wrong GPU when SLURM lists physical ids; _pick_device maps instead.
        tde.export(set_cuda_visible_devices=False, overwrite=True)
        rank, world, local_rank, local_world = tde.rank, tde.world_size, tde.local_rank, tde.local_world_size
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    else:
        rank, world, local_rank, local_world = 0, 1, 0, 1

    device = _pick_device(local_rank, local_world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"  # NCCL for the model's tensors, gloo for CPU-side metadata
    else:
        backend = "gloo"
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if world == 1:
            # A lone process needs no rendezvous: an in-memory store avoids picking a port.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                    timeout=timeout)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device,
                    local_world_size=local_world, backend=backend, job_id=job_id,
                    slurm_job_id=slurm_job_id)


def shutdown_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()

