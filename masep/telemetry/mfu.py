"""The FLOP record a training run stores in run.json, from the one formula in `flops.py`.

MFU per GPU = achieved model FLOP/s / (GPUs x peak), with the model FLOPs per token of
`train_flops_per_token`. MA Separation runs two groups of GPUs, so each group also gets an MFU
of its own, over the share of those FLOPs that its GPUs execute:

- attention group: attention projections, routers and output head (2 x their parameters per
  token) plus the attention scores and values (4 x layers x seq x hidden / 2, causal), x 3;
- MoE group: the top-k experts a token visits (2 x their parameters per token), x 3;

each over (the group's GPUs x peak x step time). The two shares add up to the whole formula
(norms and embedding look-ups are not matrix products and count in neither).

The peak is the dense bf16 rate of the run's GPU model: measured on an H200, the datasheet's for
an A100 (the paper's GPU). Another GPU model has no peak here, and a CPU run none at all: MFU is
then NULL and `peak_reason` says why.
"""
from __future__ import annotations

from typing import Optional

import torch

from masep.config import Config, ModelConfig
from masep.model import analytic_parameter_count
from masep.parallel.layout import make_layout
from masep.telemetry.flops import A100_DENSE_BF16, H200_DENSE_BF16, train_flops_per_token

PEAKS = {  # substring of the CUDA device name -> (FLOP/s, where the number comes from)
    "H200": (H200_DENSE_BF16, "dense bf16 GEMM rate measured on one H200"),
    "A100": (A100_DENSE_BF16, "A100 datasheet dense bf16 rate"),
}


def group_train_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> dict[str, float]:
    """Training FLOPs per token split into the attention group's and the MoE group's work."""
    p = analytic_parameter_count(cfg)
    up = 2 * cfg.expert_hidden if cfg.expert_activation == "swiglu" else cfg.expert_hidden
    active_experts = cfg.layers * cfg.top_k * (cfg.hidden * up + cfg.expert_hidden * cfg.hidden)
    scores = 4 * cfg.layers * seq_len * cfg.hidden * (0.5 if causal else 1.0)
    attention = 3 * (2 * (p["active_matmul"] - active_experts) + scores)
    moe = 3 * 2 * active_experts
    return {"attention": attention, "moe": moe}


def peak_for_name(name: Optional[str]) -> tuple[Optional[float], Optional[str], Optional[str]]:
    """(peak FLOP/s, its source, reason when there is none) for a GPU model name
    (as `torch.cuda.get_device_name` gives it; None or "cpu" for a CPU)."""
    if not name or name.lower() == "cpu":
        return None, None, "no GPU peak for CPU"
    for key, (peak, source) in PEAKS.items():
        if key in name:
            return peak, source, None
    return None, None, f"no peak FLOP/s known for {name}"


def peak_for(device: torch.device | str) -> tuple[Optional[float], Optional[str], Optional[str], Optional[str]]:
    """(peak FLOP/s, its source, GPU name, reason when there is none) for this device."""
    device = torch.device(device)
    if device.type != "cuda":
        return None, None, None, "no GPU peak for CPU"
    name = torch.cuda.get_device_name(device)
    peak, source, reason = peak_for_name(name)
    return peak, source, name, reason


def flops_record(cfg: Config, device: torch.device | str) -> dict:
    """What the results database needs to turn measured tokens/s into MFU."""
    layout = make_layout(cfg)
    seq = cfg.data.seq_len
    groups = group_train_flops_per_token(cfg.model, seq)
    peak, source, gpu, reason = peak_for(device)
    ma_sep = layout.strategy == "ma_sep"
    return {
        "seq_len": seq,
        "train_flops_per_token": train_flops_per_token(cfg.model, seq),
        "attention_group_flops_per_token": groups["attention"],
        "moe_group_flops_per_token": groups["moe"],
        "gpus": layout.world_size,
        "attention_group_gpus": len(layout.attention_ranks) if ma_sep else None,
        "moe_group_gpus": len(layout.moe_rank_list) if ma_sep else None,
        "peak_flops_per_gpu": peak,
        "peak_source": source,
        "gpu_name": gpu,
        "peak_reason": reason,
    }
