"""Memory per rank: components measured from the tensors, the peak from the allocator.

Parameters, gradients and optimizer states are summed from the tensors this rank holds.
The peak is `torch.cuda.max_memory_allocated` on GPU (the caching allocator's high-water
mark of live tensors) and the process's peak resident set (`ru_maxrss`) on CPU, which also
counts the interpreter and libraries; `peak_method` says which.
"""
from __future__ import annotations

import resource
import sys

import torch


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def optimizer_bytes(opt: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for state in opt.state.values() for v in state.values() if torch.is_tensor(v))


def peak_bytes(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda.max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return (rss if sys.platform == "darwin" else rss * 1024), "ru_maxrss (whole process)"


def memory_row(params, opt, device) -> dict:
    params = list(params)
    peak, method = peak_bytes(device)
    return {
        "params_bytes": tensor_bytes(params),
        "grads_bytes": tensor_bytes(p.grad for p in params),
        "optimizer_bytes": optimizer_bytes(opt),
        "peak_bytes": peak,
        "peak_method": method,
    }
