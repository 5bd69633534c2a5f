"""Checkpoints with torch.distributed.checkpoint (DCP).

Each rank contributes its local parameters under their keys (`strategy.checkpoint_params()`; shards of one
parameter get distinct keys, replicated ones share a key and DCP stores one copy), the AdamW
state of each, the step, its RNG state and the strategy's `extra_state()`. A checkpoint is
written to `step-N.tmp/` and renamed to `step-N/` by rank 0 (after an in-job recovery the lowest
survivor, `strategy.is_lead()`) after every rank finished; `latest` names the newest complete one.
"""
from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from masep.errors import ExpectedError
from masep.telemetry.writer import atomic_write_bytes

# torch is imported where a checkpoint is written or read: `masep infer` looks for one
# (`latest_checkpoint`) before its ranks start, and that check should not cost torch's import.
if TYPE_CHECKING:
    import torch


def _barrier(group=None) -> None:
    import torch.distributed as dist

    from masep.parallel.comm import wait_works

    if dist.is_initialized() and dist.get_world_size() > 1:
        wait_works([dist.barrier(group=group, async_op=True)], None)  # under ma.failover: watched


def _rng_state(device: torch.device) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}, buf)
    return buf.getvalue()


def _state(strategy, opt: Optional[torch.optim.Optimizer]) -> dict:
    model, optim = {}, {}
    for key, p in strategy.checkpoint_params():
        model[key] = p.data
        if opt is not None:
            st = opt.state.get(p)
            if st:  # before the first step AdamW holds no state
                for k, v in st.items():
                    optim[f"{key}.{k}"] = v
    return {"model": model, "optim": optim}


class CheckpointError(ExpectedError, RuntimeError):
    """A checkpoint exists but cannot be loaded (truncated, corrupt, from another layout)."""


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def latest_checkpoint(ckpt_dir: Path, warn: Callable[[str], None] = lambda line: None) -> Optional[Path]:
    """The checkpoint `latest` names; when that folder is gone (or the marker is, after a kill
    between rename and marker), the newest `step-N/` beside it, reported through `warn`."""
    ckpt_dir = Path(ckpt_dir)
    marker = ckpt_dir / "latest"
    named = marker.read_text().strip() if marker.is_file() else None
    if named and (ckpt_dir / named).is_dir():
        return ckpt_dir / named
    steps = sorted((p for p in ckpt_dir.glob("step-*") if p.is_dir() and p.name[5:].isdigit()),
                   key=_step_of)
    if named is None and not steps:
        return None
    what = f"{marker} names {named}, which is missing" if named else f"{marker} is missing"
    warn(f"{what}; " + (f"resuming from {steps[-1].name}, the newest checkpoint beside it"
                        if steps else "no other checkpoint is there, so training starts at step 0"))
    return steps[-1] if steps else None


def save(ckpt_dir: Path, step: int, strategy, opt, rank: int) -> Path:
    import torch
    import torch.distributed.checkpoint as dcp

    ckpt_dir = Path(ckpt_dir)
    final, tmp = ckpt_dir / f"step-{step}", ckpt_dir / f"step-{step}.tmp"
    if strategy.is_lead():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    _barrier(strategy.world_group)
    state = _state(strategy, opt)
    state["meta"] = {"step": torch.tensor(step)}
    state[f"rng_rank{rank}"] = _rng_state(strategy.device)
    state.update(strategy.extra_state())
    dcp.save(state, checkpoint_id=str(tmp), process_group=strategy.world_group)
    _barrier(strategy.world_group)
    if strategy.is_lead():
        previous = latest_checkpoint(ckpt_dir)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        atomic_write_bytes(ckpt_dir / "latest", f"{final.name}\n".encode())
        if previous is not None and previous != final:
            shutil.rmtree(previous, ignore_errors=True)
    _barrier(strategy.world_group)
    return final


def load(path: Path, strategy, opt: Optional[torch.optim.Optimizer], rank: int) -> int:
    """Load weights (and, when `opt` is given, optimizer and RNG state) in place; return the step."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    state = _state(strategy, None)
    state["meta"] = {"step": torch.tensor(0)}
    if opt is not None:
        # AdamW's state tensors must exist before DCP can load into them: create them empty.
        for _, p in strategy.named_parameters():
            if not opt.state.get(p):
                opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                "exp_avg_sq": torch.zeros_like(p)}
        state = _state(strategy, opt)
        state["meta"] = {"step": torch.tensor(0)}
    extra = strategy.extra_state()
    try:
        # Extra state a checkpoint lacks (written without it) keeps the strategy's initial value.
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        extra = {k: v for k, v in extra.items() if k in saved}
        state.update(extra)
        if opt is not None and f"rng_rank{rank}" in saved:
            state[f"rng_rank{rank}"] = b""
        elif opt is not None:  # written after this rank was lost in its job (ma.failover)
            print(f"rank {rank}: {path} holds no RNG state of this rank (it was lost in the job that wrote it): "
                  f"its dropout stream goes on from the seed", file=sys.stderr, flush=True)
        dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        # DCP wraps each rank's own exception; that one says what is wrong with the files.
        failures = getattr(e, "failures", None)
        cause = next(iter(failures.values()))[0] if failures else e
        first = str(cause).strip().splitlines()[0][:300] if str(cause).strip() else ""
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(cause).__name__}{': ' * bool(first)}{first}); "
                              f"move it away to start this run over") from e
    strategy.load_extra_state({k: state[k] for k in extra})
    if opt is not None and state.get(f"rng_rank{rank}"):
        rng = torch.load(io.BytesIO(state[f"rng_rank{rank}"]), weights_only=False)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and strategy.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], strategy.device)
    return int(state["meta"]["step"])
