"""The GPU benchmark: `torchrun --nproc_per_node N -m masep.bench --config h200 --out ROOT ...`
writes one ordinary run folder per call (`masep.bench.__main__`); `python -m masep.bench.table
ROOT` prints the table of the runs under ROOT (`masep.bench.table`, also the report's "GPU
benchmark" section); `masep collect --runs ROOT` loads them like any run.

Here: the synthetic workload and the decode bound both share (scripts/bench_variants.py too).
"""
from __future__ import annotations

import torch

from masep.model import analytic_parameter_count
from masep.parallel.base import GlobalBatch

HBM_BYTES_PER_S = 4.24e12  # device-to-device copy rate measured on an H200 (bytes read + written)


def synthetic_batches(cfg, seed: int):
    """Uniform random tokens (the GPU machine has no corpus); same on every rank."""
    g = torch.Generator().manual_seed(seed)
    G, T = cfg.train.global_batch, cfg.data.seq_len
    while True:
        x = torch.randint(0, cfg.model.vocab_size, (G, T + 1), generator=g)
        yield GlobalBatch(x[:, :-1], x[:, 1:], torch.ones(G, T))


def decode_bound_ms(cfg, context_len: int, batch: int) -> float:
    """Bytes a decode step must read at least (bf16 weights a token touches + its KV cache) over HBM bandwidth."""
    c = analytic_parameter_count(cfg.model)
    m = cfg.model
    up = 2 * m.expert_hidden if m.expert_activation == "swiglu" else m.expert_hidden
    per_expert = m.hidden * up + m.expert_hidden * m.hidden
    experts_touched = min(m.experts, m.top_k * batch)
    weights = c["attention"] + c["routers"] + c["head"] + c["norms"] + m.layers * experts_touched * per_expert
    kv = 2 * m.layers * context_len * m.hidden * batch
    return (2 * weights + 2 * kv) / HBM_BYTES_PER_S * 1e3
