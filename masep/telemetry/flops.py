"""One FLOP formula for every strategy (model FLOPs, not hardware FLOPs).

Per token, forward: 2 x (active parameters in matrix products: attention projections, the
routers, the top-k experts a token visits, the output head) + attention scores and values
(2 matmuls of 2 x seq x hidden per layer = 4 x layers x seq x hidden, halved when causal).
Training = 3 x forward (backward costs twice the forward). Recomputation is not counted.
MFU = achieved model FLOP/s / (GPUs x peak). The peak is the dense bf16 rate measured on the
machine the study ran on; `H200_DENSE_BF16` is the rate an 8192^3 bf16 GEMM reached on an H200.
"""
from __future__ import annotations

from masep.config import ModelConfig
from masep.model import analytic_parameter_count

H200_DENSE_BF16 = 790e12  # FLOP/s, measured dense bf16 GEMM rate on one H200
A100_DENSE_BF16 = 312e12  # FLOP/s, datasheet dense bf16/fp16 rate of one A100 (the paper's GPUs)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    active = analytic_parameter_count(cfg)["active_matmul"]
    attention = 4 * cfg.layers * seq_len * cfg.hidden * (0.5 if causal else 1.0)
    return 2 * active + attention


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return 3 * forward_flops_per_token(cfg, seq_len)


def mfu(tokens_per_s: float, cfg: ModelConfig, seq_len: int, n_gpus: int,
        peak_flops: float = H200_DENSE_BF16) -> float:
    """Model FLOPs utilisation of a training run processing `tokens_per_s` on `n_gpus`."""
    return tokens_per_s * train_flops_per_token(cfg, seq_len) / (n_gpus * peak_flops)
