"""torch.distributed inside one rank, from submitit's, torchrun's or no environment.

`init_distributed(timeout_s)` reads the job environment submitit sets (falling back to torchrun's
RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, and to a lone process when neither is there),
initialises the default process group (gloo on CPU; NCCL for CUDA tensors plus gloo for CPU
tensors on GPU) with the given collective timeout and returns a `DistInfo`. Job ids reach the
ranks through `DistInfo.job_id` / `DistInfo.slurm_job_id` (`slurm_job_id` only under SLURM); the
run writer stores the latter as run.json's `slurm_job_id`. submitit is imported only inside a
submitit job: the GPU benchmark runs under torchrun on machines without it.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from datetime import timedelta
from typing import Any, Optional


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


def current_job() -> tuple[Optional[str], Optional[str]]:
    """(submitit job id, SLURM job id) of the job this process runs in; Nones outside submitit."""
    try:
        import submitit

        env = submitit.JobEnvironment()
    except (ImportError, RuntimeError):  # no submitit (a torchrun-only machine), or not in a job
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
    raise RuntimeError(f"{count} GPUs visible to local rank {local_rank} of {local_world_size}: "
                      f"cannot tell which one is ours (CUDA_VISIBLE_DEVICES="
                      f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})")


_progress: Optional[Path] = None  # this rank's progress file (set by init_distributed in a submitit job)


def report_progress(step: int, phase: str) -> None:
    """Tell watchers outside the rank (masep.faults) which step it finished and what it does now
    ("train", "checkpoint"). A plain write and rename: no fsync on the step's path."""
    if _progress is None:
        return
    tmp = _progress.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": step, "phase": phase, "t": time.time(), "pid": os.getpid()}))
    os.replace(tmp, _progress)


def init_distributed(timeout_s: float) -> DistInfo:
    """Initialise torch.distributed for this rank from submitit's, torchrun's or no environment."""
    import torch
    import torch.distributed as dist

    job_id, slurm_job_id = current_job()
    if job_id is not None:
        import submitit

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
        if job_env.cluster in ("slurm", "local"):
            from masep.launch import progress_path, start_heartbeat  # the launcher watches both

            start_heartbeat(job_env.paths.folder, job_id, rank)
            global _progress
            _progress = progress_path(job_env.paths.folder, job_id, rank)
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
            store = None
            if hosted := os.environ.get("MASEP_HOSTED_STORE"):  # ma.failover: the launcher hosts it
                host, port = hosted.rsplit(":", 1)
                try:
                    store = dist.TCPStore(host, int(port), world, is_master=False, timeout=timeout)
                except (RuntimeError, OSError) as e:  # DistNetworkError, DistStoreError, timeouts
                    from masep.config import ConfigError

                    raise ConfigError(f"rank {rank}: cannot reach the rendezvous store at {hosted} that the "
                                        f"launcher hosts for ma.failover ({str(e).splitlines()[0][:200]}); set "
                                        f"launch.store_host to an address of that host this node can reach") from e
            dist.init_process_group(backend, init_method=None if store else "env://", store=store, rank=rank,
                                    world_size=world, timeout=timeout)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device,
                    local_world_size=local_world, backend=backend, job_id=job_id,
                    slurm_job_id=slurm_job_id)


def shutdown_distributed(process_ends: bool = False) -> None:
    """Leave the process group. With `process_ends` (a rank in a process of its own), also spare
    the interpreter's exit the walk over torch's objects by the garbage collector: about a
    second per rank process."""
    import gc

    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    if process_ends:
        gc.freeze()

