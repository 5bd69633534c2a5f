"""Run a function on N CPU ranks over gloo (for tests and parity checks)."""
from __future__ import annotations

import os
import socket
import tempfile
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, out_dir, timeout_s, hosted):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    path = os.path.join(out_dir, f"rank{rank}.pt")
    timeout = timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timeout) if hosted else None
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout, store=store)
        result = fn(rank, world, *args)
        torch.save({"ok": True, "result": result}, path)
    except BaseException as e:  # noqa: BLE001 - report any failure to the parent
        torch.save({"ok": False, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}, path)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# Rank processes come from a fork server that has imported these once: spawning fresh
# interpreters that each import torch costs seconds per rank on a small machine.
_PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "masep.model", "masep.parallel.base",
            "masep.runtime.trainer", "torch.distributed.checkpoint"]


def run_ranks(world: int, fn, *args, timeout_s: float = 120.0, injector=None) -> list:
    """Call fn(rank, world, *args) on `world` new processes; return each rank's result.
    `fn` must be importable (a module-level function).

    With `injector`, this process hosts the ranks' TCPStore (so it outlives any rank, as the
    launcher's does under `ma.failover`) and calls `injector(store, pids)` on a thread: it may
    kill ranks from outside; a rank killed by a signal has the result None."""
    import multiprocessing
    import threading

    multiprocessing.set_forkserver_preload(_PRELOAD)
    port, store = _free_port(), None
    if injector is not None:
        store = dist.TCPStore("127.0.0.1", port, world, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=timeout_s))
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_worker, args=(world, port, fn, args, out_dir, timeout_s, store is not None),
                                 nprocs=world, join=False, start_method="forkserver")
        if injector is not None:
            threading.Thread(target=injector, args=(store, [p.pid for p in ctx.processes]), daemon=True).start()
            for p in ctx.processes:  # ctx.join would stop at the first rank killed
                p.join(timeout_s * 4)
        else:
            while not ctx.join(timeout=timeout_s * 2):
                pass
        results = []
        for r in range(world):
            if injector is not None and ctx.processes[r].exitcode is not None and ctx.processes[r].exitcode < 0:
                results.append(None)  # killed by a signal
                continue
            data = torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
            if not data["ok"]:
                raise RuntimeError(f"rank {r} failed: {data['error']}")
            results.append(data["result"])
        return results
