"""Time spent per communication kind, measured around the actual calls.

On GPU, CUDA events are recorded on the current stream around each call and read once per
step (no synchronisation inside the step); on CPU, the monotonic clock is read around each
(blocking) call. Strategies wrap every collective or point-to-point call in
`comm_timer().time(kind)`; the trainer reads and resets the totals once per step.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

COMM_KINDS = ("attn_allreduce", "moe_dispatch", "grad_sync", "p2p")  # no parameter broadcast: every rank builds the seed's weights


class CommTimer:
    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.reset()

    def reset(self) -> None:
        self._cpu: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def time(self, kind: str):
        if kind not in COMM_KINDS:
            raise ValueError(f"unknown communication kind {kind!r}")
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((kind, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._cpu[kind] += time.perf_counter() - t0

    def totals(self) -> dict[str, float]:
        """Seconds per kind since the last reset (synchronises the GPU once)."""
        out = {k: self._cpu.get(k, 0.0) for k in COMM_KINDS}
        if self._events:
            self._events[-1][2].synchronize()
            for kind, start, end in self._events:
                out[kind] += start.elapsed_time(end) / 1e3
        return out


_current = CommTimer()


def comm_timer() -> CommTimer:
    return _current


def set_comm_timer(timer: CommTimer) -> None:
    global _current
    _current = timer
