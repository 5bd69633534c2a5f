"""Per-kind communication times (Table 2's split) against delays injected into the collectives
that a strategy issues inside the attention or inside the MoE of each block.

Only torch.distributed's collectives and the model's `Block` methods are patched, so the check
holds however a strategy arranges its own code: a delay added to every collective issued while
a block's attention runs (forward or backward) must show up as `attn_allreduce`, one added
inside its MoE as `moe_dispatch`, and neither anywhere else.
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

from masep.config import load_config
from helpers import SMALL_VOCAB

KIND = {"attention": "attn_allreduce", "moe": "moe_dispatch"}
COLLECTIVES = ("all_reduce", "all_to_all_single", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "broadcast")


class _Region(torch.autograd.Function):
    """Identity; its backward records that the backward pass has entered `region` (None: left)."""

    @staticmethod
    def forward(ctx, x, state, region):
        ctx.state, ctx.region = state, region
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.state["region"] = ctx.region
        return grad, None, None


def _marked(method, state: dict, region: str):
    """`method(self, x, ...)` of a Block, with `state["region"]` set while it runs forward and
    while its backward runs (from its output's gradient to its input's)."""
    def wrapper(self, x, *args, **kwargs):
        x = _Region.apply(x, state, None)
        state["region"] = region
        try:
            out = method(self, x, *args, **kwargs)
        finally:
            state["region"] = None
        if isinstance(out, tuple):
            return (_Region.apply(out[0], state, region),) + tuple(out[1:])
        return _Region.apply(out, state, region)
    return wrapper


def _delayed_rank(rank: int, world: int, strategy: str, delay_s: float, steps: int) -> dict:
    import torch.distributed as dist

    from masep.model.moe_transformer import Block
    from masep.parallel.base import GlobalBatch
    from masep.runtime.trainer import Trainer

    state = {"region": None, "slow": None, "sleeps": 0}

    def delayed(collective):
        def call(*args, **kwargs):
            if state["slow"] is not None and state["region"] == state["slow"]:
                time.sleep(delay_s)
                state["sleeps"] += 1
            return collective(*args, **kwargs)
        return call

    for name in COLLECTIVES:
        setattr(dist, name, delayed(getattr(dist, name)))
    Block.attention_residual = _marked(Block.attention_residual, state, "attention")
    Block.moe_residual = _marked(Block.moe_residual, state, "moe")

    cfg = load_config("tiny", SMALL_VOCAB + [f"parallel.strategy={strategy}", f"parallel.world_size={world}"])
    trainer = Trainer(cfg, rank)
    g = torch.Generator().manual_seed(0)
    phases = {}
    for slow in (None, "attention", "moe"):
        state["slow"], state["sleeps"] = slow, 0
        rows = []
        for _ in range(steps):
            x = torch.randint(0, 1000, (4, 33), generator=g)
            rows.append(trainer.train_step(GlobalBatch(x[:, :-1], x[:, 1:], torch.ones(4, 32))))
        phases[slow] = {"rows": rows, "injected_s": state["sleeps"] * delay_s / steps}
    return phases


@pytest.mark.parametrize("strategy", ["tp", "ep_dp"])
def test_delays_inside_attention_and_moe_are_timed_under_their_own_kinds(strategy):
    from masep.telemetry.timing import COMM_KINDS
    from masep.testing import run_ranks

    results = run_ranks(2, _delayed_rank, strategy, 0.1, 3, timeout_s=300)
    checked = []
    for rank, phases in enumerate(results):
        def median(phase, kind):
            return statistics.median(r[f"comm_{kind}_s"] for r in phases[phase]["rows"])

        for region in ("attention", "moe"):
            injected = phases[region]["injected_s"]  # per step
            if not injected:
                continue  # this strategy issues no collective there (ep_dp's attention)
            gain = {k: median(region, k) - median(None, k) for k in COMM_KINDS}
            assert gain[KIND[region]] >= 0.7 * injected, (rank, region, gain, injected)
            others = {k: v for k, v in gain.items() if k != KIND[region]}
            assert all(v <= 0.2 * injected for v in others.values()), (rank, region, gain, injected)
            checked.append(region)
    # tp communicates in both, ep_dp only in the MoE
    assert sorted(set(checked)) == (["attention", "moe"] if strategy == "tp" else ["moe"])
