"""Sharded building blocks of the strategies: which parameters tensor parallelism splits and how
(`is_tp_sharded`, `tp_shard`), the sharded attention and MoE (`TPAttention`, `TPExperts`, `TPMoE`,
`shard_blocks`), one dropout stream per group (`sync_rng_state`, `private_rng`), and `Stage`:
some layers of the model with the embedding and the head where a stage holds them.

Tensor parallelism inside a group of t ranks (rank i of the group):
- Attention heads: rank i holds heads [i*h/t, (i+1)*h/t) -- the rows of the fused qkv
  projection holding those heads' q, k and v (column parallel) and the matching columns of
  the output projection (row parallel), and the KV cache of those heads. `copy_to_group`
  enters the region (identity forward, all-reduce of the input gradient backward) and
  `reduce_from_group` sums the partial outputs (all-reduce forward, identity backward).
  Kind `attn_allreduce`.
- Experts: rank i holds experts [i*E/t, (i+1)*E/t). Tokens are not dispatched (paper Table 2:
  TP uses no all-to-all): after the attention all-reduce every rank of the group holds the
  same tokens, routes them with its copy of the router (identical decisions and capacity
  drops), runs its own experts on the tokens routed to them and weights their outputs; one
  all-reduce of the combined [tokens, hidden] output makes it whole. That all-reduce is the
  MoE's combine, so it and its backward counterparts are timed under kind `moe_dispatch`.
  The sum is taken after the combine rather than over the per-assignment outputs because
  those are top_k times as many rows. The price: each rank's combine weights see only its own
  assignments, so their gradient is partial, as is the gradient of the MoE input on the expert
  path. Both pass through one `copy_many_to_group` (one all-reduce of their [tokens, top_k] and
  [tokens, hidden] gradients in the backward), while the router's direct path (the auxiliary
  losses) is replicated and needs no communication.
  Backward traffic per MoE layer: [tokens, hidden + top_k]; forward: [tokens, hidden].
Replicated inside a group: embedding, norms, routers, output head and the loss; with the
operators above their gradients are complete on every rank of the group.

Dropout: the replicated code (residual dropout) must draw the same masks on every rank of a
group, but the trainer seeds each rank differently: `sync_rng_state` gives the group the RNG
state of one rank, and expert dropout (whose draws depend on the rank's own experts) runs on a
private stream seeded from the shared one (`private_rng`), the RNG-tracker idea of Megatron-LM.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from masep.config import ModelConfig
from masep.model import (Attention, Block, Experts, KVCache, MoE, MoETransformer, Routing, dispatch_combine,
                         routed_positions)
from masep.parallel.comm import all_reduce_sum, copy_many_to_group, copy_to_group, reduce_from_group

_SHARDED_SUFFIXES = ("attn.qkv.weight", "attn.out.weight", "moe.experts.w_up", "moe.experts.w_down")


def is_tp_sharded(name: str) -> bool:
    """Whether parameter `name` (full-model naming) is split over the TP group."""
    return name.endswith(_SHARDED_SUFFIXES)


def tp_shard(name: str, full: torch.Tensor, cfg: ModelConfig, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The part of the full tensor of parameter `name` that TP rank `tp_rank` holds (a view)."""
    heads, d, hidden = cfg.heads // tp_size, cfg.head_dim, cfg.hidden
    if name.endswith("attn.qkv.weight"):  # rows [q heads | k heads | v heads], each by head
        return full.view(3, cfg.heads, d, hidden)[:, tp_rank * heads:(tp_rank + 1) * heads].reshape(-1, hidden)
    if name.endswith("attn.out.weight"):  # columns by head
        return full.view(hidden, cfg.heads, d)[:, tp_rank * heads:(tp_rank + 1) * heads].reshape(hidden, -1)
    if name.endswith(("moe.experts.w_up", "moe.experts.w_down")):
        n = cfg.experts // tp_size
        return full[tp_rank * n:(tp_rank + 1) * n]
    return full




def sync_rng_state(group, src: int, device: torch.device) -> None:
    """Give every rank of `group` the RNG state of global rank `src` (CPU and, on GPU, device)."""
    states = [(torch.get_rng_state, torch.set_rng_state)]
    if device.type == "cuda":
        states.append((lambda: torch.cuda.get_rng_state(device), lambda s: torch.cuda.set_rng_state(s, device)))
    for get, put in states:
        state = get().to(device)  # NCCL moves device tensors only
        dist.broadcast(state, src=src, group=group)
        put(state.cpu())


@contextmanager
def private_rng(device: torch.device, stream: int):
    """Random draws inside come from a stream private to `stream` (e.g. the TP rank); the shared
    stream outside advances identically on every rank (one draw, for the private seed), and the
    private stream is a function of the shared one, so checkpointing the shared state suffices."""
    seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    mixed = (seed ^ ((stream + 1) * 0x9E3779B97F4A7C15)) % (2 ** 63)
    if device.type == "cuda":
        gen = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    else:
        gen = torch.default_generator
    shared = gen.get_state()
    gen.manual_seed(mixed)
    try:
        yield
    finally:
        gen.set_state(shared)




class TPAttention(Attention):
    """This rank's heads; the partial output projection is summed over the TP group."""

    def __init__(self, hidden: int, n_heads_local: int, head_dim: int, group, tp_size: int):
        super().__init__(hidden, n_heads_local, head_dim)
        self.group, self.tp_size = group, tp_size

    def forward(self, x, cos, sin, start_pos=0, cache=None):
        if self.tp_size > 1:
            x = copy_to_group(x, self.group, "attn_allreduce")
        y = super().forward(x, cos, sin, start_pos, cache)
        if self.tp_size > 1:
            y = reduce_from_group(y, self.group, "attn_allreduce")
        return y

    def decode(self, x, cos, sin, pos, cache):
        # Untimed collective: the comm timers' events must stay out of a fixed-shape step.
        y = super().decode(x, cos, sin, pos, cache)
        return all_reduce_sum(y, self.group) if self.tp_size > 1 else y


class TPExperts(Experts):
    """Experts [first, first + n_local) of the layer. Receives every kept assignment sorted by
    expert (counts for all experts, as `dispatch_combine` hands them), computes the rows of its
    own experts and returns zeros for the others' rows."""

    def __init__(self, n_local: int, first: int, hidden: int, ffn: int, activation: str, dropout: float,
                 private_stream: Optional[int] = None):
        super().__init__(n_local, hidden, ffn, activation, dropout)
        self.first = first
        self.private_stream = private_stream  # None: draw dropout masks from the shared stream

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        ends = torch.cumsum(counts, 0).tolist()
        start = ends[self.first - 1] if self.first > 0 else 0
        end = ends[self.first + self.n_experts - 1]
        mine, my_counts = x_sorted[start:end], counts[self.first:self.first + self.n_experts]
        if self.private_stream is not None and self.training and self.dropout > 0:
            with private_rng(x_sorted.device, self.private_stream):
                y = super().forward(mine, my_counts)
        else:
            y = super().forward(mine, my_counts)
        width = x_sorted.shape[1]
        return torch.cat([y.new_zeros(start, width), y, y.new_zeros(x_sorted.shape[0] - end, width)])

    def forward_static(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """`forward` with fixed shapes and no host synchronisation (decode steps)."""
        return self.forward_block(x_sorted, counts, self.first)


class TPMoE(MoE):
    """Replicated router, this rank's experts, and the all-reduce that completes the combine."""

    def __init__(self, cfg: ModelConfig, group, tp_rank: int, tp_size: int, private_stream: Optional[int]):
        super().__init__(cfg)  # built on the meta device by `shard_block`: the full experts cost nothing
        n = cfg.experts // tp_size
        self.experts = TPExperts(n, tp_rank * n, cfg.hidden, cfg.expert_hidden, cfg.expert_activation,
                                 cfg.expert_dropout, private_stream)
        self.group, self.tp_size = group, tp_size

    def forward(self, x, expert_fn=None, valid=None):
        shape = x.shape
        x_flat = x.reshape(-1, shape[-1])
        routing = self.route(x_flat, valid)
        combine, x_in = routing, x_flat
        if self.tp_size > 1:
            # Each rank weights only its own assignments: sum the weights' and the expert
            # path's input gradients over the group (the router's aux-loss path is complete).
            x_in, weight = copy_many_to_group([x_flat, routing.weight], self.group, "moe_dispatch")
            combine = dataclasses.replace(routing, weight=weight)
        y = dispatch_combine(x_in, combine, expert_fn or self.experts, self.cfg.experts)
        if self.tp_size > 1:
            y = reduce_from_group(y, self.group, "moe_dispatch")
        return y.view(shape), routing

    def decode(self, x: torch.Tensor, expert_fn=None) -> torch.Tensor:
        y = super().decode(x, self.experts.forward_static)
        return all_reduce_sum(y, self.group) if self.tp_size > 1 else y


def shard_block(block: Block, cfg: ModelConfig, group, tp_rank: int, tp_size: int,
                private_stream: Optional[int] = None) -> Block:
    """Replace `block`'s attention and MoE, in place, by this rank's TP shards of them."""
    full = block.state_dict()
    device = block.attn.qkv.weight.device
    with torch.device("meta"):
        attn = TPAttention(cfg.hidden, cfg.heads // tp_size, cfg.head_dim, group, tp_size)
        moe = TPMoE(cfg, group, tp_rank, tp_size, private_stream)
    for prefix, module in (("attn.", attn), ("moe.", moe)):
        module.to_empty(device=device)
        module.load_state_dict({k[len(prefix):]: tp_shard(k, v, cfg, tp_rank, tp_size)
                                for k, v in full.items() if k.startswith(prefix)})
    block.attn, block.moe = attn, moe
    return block


def shard_blocks(model: MoETransformer, layers: Iterable[int], group, tp_rank: int, tp_size: int) -> nn.ModuleDict:
    """Layers `layers` of `model`, sharded in place over a TP group ({str(layer): block})."""
    cfg = model.cfg
    if cfg.heads % tp_size or cfg.experts % tp_size:
        raise ValueError(f"tp {tp_size} must divide {cfg.heads} heads and {cfg.experts} experts")
    # Expert dropout draws per-rank masks; only replicated dropout after it needs shielding.
    private = tp_rank if tp_size > 1 and cfg.dropout > 0 and cfg.expert_dropout > 0 else None
    return nn.ModuleDict({str(i): shard_block(model.blocks[i], cfg, group, tp_rank, tp_size, private) for i in layers})


class Stage(nn.Module):
    """Layers `layer_ids` of the model (`blocks`: e.g. TP shards of them), plus the embedding on
    a first stage and the final norm and head on a last. Parameter names stay those of the full
    model (`blocks.<i>....`)."""

    def __init__(self, model: MoETransformer, layer_ids: Iterable[int], first: bool, last: bool,
                 blocks: Optional[nn.ModuleDict] = None):
        super().__init__()
        self.cfg = model.cfg
        self.layer_ids = list(layer_ids)
        self.embed = model.embed if first else None
        self.blocks = blocks if blocks is not None else nn.ModuleDict({str(i): model.blocks[i] for i in self.layer_ids})
        self.norm = model.norm if last else None
        self.head = model.head if last else None
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def run_layers(self, x: torch.Tensor, start_pos: int = 0, caches: Optional[list[KVCache]] = None,
                   mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, list[tuple[int, Routing]]]:
        """Positions where `mask` [B, T] is 0 (padding) are not routed."""
        valid = routed_positions(mask)
        routings = []
        for j, (i, block) in enumerate(zip(self.layer_ids, self.blocks.values())):
            x = block.attention_residual(x, self.rope_cos, self.rope_sin, start_pos,
                                         caches[j] if caches is not None else None)
            x, routing = block.moe_residual(x, valid=valid)
            routings.append((i, routing))
        return x, routings

    def decode_layers(self, x: torch.Tensor, pos: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """`run_layers` for one token with fixed shapes (`Block.decode`)."""
        for block, cache in zip(self.blocks.values(), caches):
            x = block.decode(x, self.rope_cos, self.rope_sin, pos, cache)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return MoETransformer.logits(self, x)  # the model's own output math, on this stage

    def new_caches(self, batch: int, max_len: int, dtype, device) -> list[KVCache]:
        return [KVCache.empty(batch, b.attn.n_heads, max_len, b.attn.head_dim, dtype, device)
                for b in self.blocks.values()]
