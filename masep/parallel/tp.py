"""Tensor parallelism (Megatron-LM style) inside groups of `tp` ranks, data parallelism across
the groups: strategy `tp` (the paper's TP=8 baseline, DP = world / tp).

Layout (masep.parallel.layout): rank = dp_index * tp + tp_index, so a TP group is `tp`
neighbouring ranks and a DP group is the ranks with the same tp_index.

What is split inside a TP group of size t (rank i of the group):
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
Replicated inside a TP group: embedding, norms, routers, output head and the loss; with the
operators above their gradients are complete on every rank of the group.

Data parallelism: replica d takes the contiguous block d of the global batch's micro-batches
(`layout.microbatches` of them); after the backward every gradient is summed over the DP group
with `sync_gradients` (kind `grad_sync`). Global-batch semantics (loss normalisation, aux
losses per micro-batch, gradient sums) are those of masep/parallel/base.py, so a step computes
what `SingleRank` computes. `replication(name)` is dp for head/expert shards and tp * dp for
the replicated parameters; statistics are added by the TP-rank 0 of each replica only.

Decode: every rank of a TP group decodes the whole prompt batch with its heads' shard of the KV
cache; every DP replica decodes it too (no cross-replica traffic inside the timed loop, so the
per-token times are those of one TP group serving the batch, which is what TP's TPOT means),
and rank 0's tokens are broadcast at the end so every rank returns the same ones.

Dropout: the replicated code (residual dropout) must draw the same masks on every rank of a TP
group, but the trainer seeds each rank differently. When `model.dropout > 0` the constructor
therefore broadcasts the RNG state of the group's rank 0, and expert dropout (whose draws depend
on the rank's own experts) runs on a private stream seeded from the shared one
(`private_rng`), the RNG-tracker idea of Megatron-LM.

Building blocks for other strategies (tp_pp):
    stage = TPStage(model, layers, tp_group, tp_rank, tp_size, embed=..., head=...)
holds layers `layers` (global indices) of `model` sharded over the TP group, with the embedding
when `embed` and the final norm and head when `head`. `stage(x, start_pos, caches)` takes token
ids (with embedding) or hidden states [B, T, hidden] and returns (logits or hidden states,
routings of its layers). Parameter names are those of the full model (`blocks.<i>.attn...`);
`stage.new_caches(batch, max_len, dtype, device)` gives one KV cache per local layer;
`is_tp_sharded(name)` and `tp_shard(name, full, cfg, tp_rank, tp_size)` tell which parameters
are split and slice a full tensor the way the stage holds it; `sync_rng_state(group, src, device)`
gives the group one dropout stream. The stage takes ownership of `model`'s modules (the blocks
are sharded in place, freeing the full weights).
"""
from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from masep.config import ModelConfig
from masep.model import Attention, Block, Experts, KVCache, MoE, MoETransformer, dispatch_combine, lm_loss_sum
from masep.parallel.base import Generation, GlobalBatch, LocalStats, StaticDecoder, StepStats, Strategy, sync
from masep.parallel.comm import (all_reduce_sum, copy_many_to_group, copy_to_group, new_group_containing,
                                 reduce_from_group, sync_gradients)

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


# ------------------------------------------------------------------ RNG for dropout


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


# ------------------------------------------------------------------ sharded modules


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

    def forward(self, x, expert_fn=None):
        shape = x.shape
        x_flat = x.reshape(-1, shape[-1])
        routing = self.route(x_flat)
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


class TPStage(nn.Module):
    """Layers `layers` of `model` sharded over a TP group, optionally with the embedding (first
    stage) and the final norm and head (last stage). See the module docstring."""

    def __init__(self, model: MoETransformer, layers: Iterable[int], group, tp_rank: int, tp_size: int,
                 *, embed: bool, head: bool):
        super().__init__()
        cfg = model.cfg
        if cfg.heads % tp_size or cfg.experts % tp_size:
            raise ValueError(f"tp {tp_size} must divide {cfg.heads} heads and {cfg.experts} experts")
        self.cfg, self.tp_rank, self.tp_size = cfg, tp_rank, tp_size
        self.layer_ids = list(layers)
        # Expert dropout draws per-rank masks; only replicated dropout after it needs shielding.
        private = tp_rank if tp_size > 1 and cfg.dropout > 0 and cfg.expert_dropout > 0 else None
        self.embed = model.embed if embed else None
        self.blocks = nn.ModuleDict({str(i): shard_block(model.blocks[i], cfg, group, tp_rank, tp_size, private)
                                     for i in self.layer_ids})
        self.norm = model.norm if head else None
        self.head = model.head if head else None
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def forward(self, x: torch.Tensor, start_pos: int = 0, caches: Optional[list[KVCache]] = None):
        if self.embed is not None:
            x = self.embed(x)
        routings = []
        for j, block in enumerate(self.blocks.values()):
            x = block.attention_residual(x, self.rope_cos, self.rope_sin, start_pos,
                                         caches[j] if caches is not None else None)
            x, routing = block.moe_residual(x)
            routings.append(routing)
        if self.head is not None:
            return MoETransformer.logits(self, x), routings  # the model's own head code
        return x, routings

    @torch.no_grad()
    def decode_logits(self, ids: torch.Tensor, pos: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """`MoETransformer.decode_logits` on a stage holding the embedding and the head (`tp`'s)."""
        x = self.embed(ids)
        for block, cache in zip(self.blocks.values(), caches):
            x = block.decode(x, self.rope_cos, self.rope_sin, pos, cache)
        return MoETransformer.logits(self, x)[:, -1]

    def new_caches(self, batch: int, max_len: int, dtype, device) -> list[KVCache]:
        heads = self.cfg.heads // self.tp_size
        return [KVCache.empty(batch, heads, max_len, self.cfg.head_dim, dtype, device) for _ in self.layer_ids]


# ------------------------------------------------------------------ the strategy


def _contiguous_share(items: list, parts: int, index: int) -> list:
    """Block `index` of `items` cut into `parts` contiguous blocks of near-equal size."""
    n = len(items)
    return items[index * n // parts:(index + 1) * n // parts]


class TensorParallel(Strategy):
    name = "tp"

    def __init__(self, cfg, layout, rank, device, model: MoETransformer):
        super().__init__(cfg, layout, rank, device)
        coords = layout.coords(rank)
        self.dp_index, self.tp_rank = coords["dp"], coords["tp"]
        tp, dp = layout.tp, layout.dp
        timeout = timedelta(seconds=cfg.parallel.timeout_s)
        # Every rank creates every group, in the same order (torch.distributed requires it).
        self.tp_group = new_group_containing(
            rank, [[layout.rank_of(d, 0, t) for t in range(tp)] for d in range(dp)], timeout)
        self.dp_group = new_group_containing(
            rank, [[layout.rank_of(d, 0, t) for d in range(dp)] for t in range(tp)], timeout)
        self.stage = TPStage(model, range(cfg.model.layers), self.tp_group, self.tp_rank, tp,
                             embed=True, head=True).to(self.device)
        if tp > 1 and cfg.model.dropout > 0:
            sync_rng_state(self.tp_group, layout.rank_of(self.dp_index, 0, 0), self.device)

    def modules(self):
        return [self.stage]

    def named_parameters(self):
        return list(self.stage.named_parameters())

    def replication(self, name: str) -> int:
        return self.layout.dp if is_tp_sharded(name) else self.layout.dp * self.layout.tp

    def checkpoint_key(self, name: str) -> str:
        return f"{name}.tp{self.tp_rank}of{self.layout.tp}" if is_tp_sharded(name) else name

    def _my_microbatches(self, batch: GlobalBatch) -> tuple[list[GlobalBatch], int]:
        mbs = batch.microbatches(self.layout.microbatch_size)
        m, dp = self.layout.microbatches, self.layout.dp
        if len(mbs) != m * dp:
            raise ValueError(f"tp: the global batch has {len(mbs)} micro-batches, the layout expects "
                             f"{m} per replica x {dp} replicas")
        return mbs[self.dp_index * m:(self.dp_index + 1) * m], len(mbs)

    def forward_backward(self, batch: GlobalBatch) -> StepStats:
        batch = batch.to(self.device)
        n_valid = batch.n_valid()
        mine, n_micro = self._my_microbatches(batch)
        lb_coef, z_coef = self.aux_coefficients()
        stats = LocalStats(self.cfg.model.layers, self.cfg.model.experts)
        for mb in mine:
            with self.autocast():
                logits, routings = self.stage(mb.inputs)
            ce = lm_loss_sum(logits, mb.targets, mb.mask)
            aux = sum(lb_coef * r.lb_loss + z_coef * r.z_loss for r in routings) / n_micro
            (ce / max(n_valid, 1) + aux).backward()
            if self.tp_rank == 0:  # the group computed the same numbers; count them once
                stats.add_ce(ce)
                for layer, r in enumerate(routings):
                    stats.add_routing(layer, r)
        params = [p for _, p in self.named_parameters()]
        for p in params:  # an expert no token chose still has a (zero) gradient, as on one rank
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        sync_gradients(params, self.dp_group)
        return stats.reduce(n_valid, n_micro, self.device)

    @torch.no_grad()
    def evaluate(self, batch: GlobalBatch) -> tuple[float, int]:
        batch = batch.to(self.device)
        was_training = self.stage.training
        self.stage.eval()
        ce = torch.zeros((), dtype=torch.float64)
        mbs = _contiguous_share(batch.microbatches(self.layout.microbatch_size), self.layout.dp, self.dp_index)
        for mb in mbs:
            with self.autocast():
                logits, _ = self.stage(mb.inputs)
            if self.tp_rank == 0:
                ce += float(lm_loss_sum(logits, mb.targets, mb.mask))
        self.stage.train(was_training)
        if dist.is_initialized() and dist.get_world_size() > 1:
            ce = ce.to(self.device)
            dist.all_reduce(ce)
        return float(ce), batch.n_valid()

    def _graph(self) -> bool:
        # Capturing NCCL collectives in a CUDA graph has not been verified on GPUs here yet:
        # only a TP group of one rank replays its step as a graph.
        return self.cfg.infer.cuda_graph and self.device.type == "cuda" and self.layout.tp == 1

    def decode_path(self) -> str:
        return "fixed-shape step in a CUDA graph" if self._graph() else super().decode_path()

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> Generation:
        stage = self.stage
        was_training = stage.training
        stage.eval()
        prompt = prompt.to(self.device)
        B, T0 = prompt.shape
        caches = stage.new_caches(B, T0 + new_tokens, self.compute_dtype(), self.device)
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            dist.barrier()  # every rank starts the clock together
        sync(self.device)
        t0 = time.perf_counter()
        with self.autocast():
            logits, _ = stage(prompt, 0, caches)
        next_ids = logits[:, -1].argmax(-1)
        sync(self.device)
        prefill_s = time.perf_counter() - t0
        # The fixed-shape step, without a CUDA graph where it holds collectives (see decode_path).
        with self.autocast():
            decoder = StaticDecoder(lambda ids, pos: stage.decode_logits(ids, pos, caches).argmax(-1),
                                    next_ids[:, None], torch.tensor([T0], device=self.device), self._graph())
        rest, times = self.stream_tokens(decoder, new_tokens - 1)
        stage.train(was_training)
        tokens = torch.stack([next_ids.cpu()] + rest, 1).to(self.device)
        if distributed:  # replicas decoded the same batch; rank 0's tokens are the answer
            dist.broadcast(tokens, src=0)
        return Generation(tokens.cpu(), prefill_s, times)
