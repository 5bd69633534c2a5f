"""MA Separation (strategy `ma_sep`): attention on one group of ranks, MoE experts on another.

Layout (masep.parallel.layout; world = attn_tp * attn_replicas + moe_ranks)
    ranks [0, attn_tp * attn_replicas)   attention ranks, replica-major:
                                          rank = replica * attn_tp + head_shard
    the next moe_ranks ranks              MoE ranks; MoE rank j holds experts
                                          [j * E/moe_ranks, (j + 1) * E/moe_ranks) of every layer
The paper's Section 4.4 ("8 attention GPUs, 4 heads per GPU, 2x replication, 2-way sequence
parallelism") cannot hold on 8 GPUs as written. This module takes the reading the project's
spec settles on: 2 attention replicas x 4-way head parallelism (8 of the 32 heads per GPU), the
two replicas splitting the token stream in two, plus 8 MoE GPUs with 2 experts each, i.e.
`parallel.attn_tp=4, attn_replicas=2, moe_ranks=8` on 16 GPUs.

What each rank holds
- Attention rank (replica r, head shard t): the embedding, every layer's norms, router and its
  shard of the attention heads (fused qkv rows and output-projection columns of heads
  [t*h/attn_tp, (t+1)*h/attn_tp), Megatron column/row parallel: `copy_to_group` /
  `reduce_from_group` inside the replica, kind `attn_allreduce`), the final norm and the output
  head. Everything but the heads is replicated inside the replica. Replica r takes the
  contiguous block r of the global batch's micro-batches.
- MoE rank j: its experts of every layer (`Experts(E/moe_ranks, ...)` with sliced weights), and
  nothing else.

One layer for one micro-batch
    attention replica: x -> attention -> h -> moe_norm -> route (router on the attention side,
        capacity per micro-batch exactly as on one rank) -> the kept (token, expert) rows sorted
        by expert, as `masep.model.dispatch_combine` sorts them
    dispatch: the sorted rows are cut into attn_tp contiguous shares; head shard t sends only
        share t (`scatter_rows`), each row to the MoE rank owning its expert, so no row crosses
        to the MoE group twice. Before the rows, it sends every MoE rank the number of rows it
        carries per local expert (the count exchange), always, even when they are all zero.
    MoE rank: receives the rows of every attention rank, sorts them by local expert (stable:
        sender order inside an expert), runs its experts once on all of them, un-sorts and
        sends each sender its rows back.
    combine: each head shard receives its share's outputs; the replica re-assembles the full
        sorted block (`gather_uneven_rows`, inside the replica), weights and sums per token as
        `dispatch_combine` does, and adds the residual.
    Backward: the gradient of the received rows goes back to the MoE ranks, which run the
        experts' backward and return the gradient of the rows they received; `scatter_rows`'
        backward all-gathers those gradients inside the replica.
All dispatch/combine traffic (counts, rows, their gradients, the replica's gathers) is timed
under `moe_dispatch`. Only time spent blocked is recorded (posting, then waiting for a handle),
so a transfer hidden behind computation costs nothing; by the same token a rank's wait includes
the time the other group needed to produce the data (on MoE ranks, mostly the attention side's
compute): the figure is exposed communication plus imbalance between the groups, not wire time.
Rows travel in the compute dtype (bf16 under GPU autocast, where the experts' matrix products
would cast them anyway; fp32 on CPU).

Transport: batched non-blocking point-to-point (`post_p2p` = `dist.batch_isend_irecv`) between
each attention rank and each MoE rank rather than an all-to-all. Reasons: the two groups play
different parts (attention ranks never exchange rows with each other, which an all-to-all over
attention + MoE ranks would still make every rank take part in), the MoE ranks serve all replicas
at once (overlapping all-to-all groups would have to be ordered against each other), and the
overlap below needs a handle to wait on later for each micro-batch's transfer. Attention -> MoE
traffic uses one process group and MoE -> attention traffic another: NCCL runs a group's
operations in order on one stream, so with a single group a return transfer could queue behind
the next dispatch (or the reverse) and both sides could wait on each other.

Schedule (deterministic; both sides derive it from the batch shape and the layout alone)
Let L = layers, n = layout.microbatches (per replica), m = parallel.microbatches (in flight,
at most n). A replica's micro-batches run in waves of m. Segment s of a micro-batch is:
    s = 0:        embedding, attention of layer 0, route 0, dispatch X(0)
    0 < s < L:    wait Y(s-1), combine layer s-1, attention of layer s, route s, dispatch X(s)
    s = L:        wait Y(L-1), combine layer L-1, final norm, head, loss
X(l, i) are the routed rows of layer l, micro-batch i of the wave; Y(l, i) their expert
outputs; GY / GX the gradients of Y / X. Each segment is its own autograd graph (its inputs
from the previous segment are leaves), so the backward can run one segment at a time.

    attention rank, per wave              MoE rank, per wave
    forward:                              forward:
      for s in 0..L:                        for l in 0..L-1:
        for i in wave:                        for i in wave:
          segment s of i                        recv counts, recv X(l, i) from every
          (waits Y(s-1, i), posts X(s, i)         attention rank; experts; post Y(l, i)
           and the receive of Y(s, i))
    backward:                             backward:
      for s in L..0:                        for l in L-1..0:
        for i in wave:                        for i in wave:
          wait GX(s, i) (s < L); backward       recv GY(l, i); backward of the experts;
          of segment s; post GY(s-1, i)         post GX(l, i)
          and the receive of GX(s-1, i)

Overlap ("ping-pong", MegaScale-Infer): with m >= 2, while the MoE ranks compute layer l of
micro-batch i, the attention ranks compute segment l+1... of micro-batch i+1 (its attention
and routing), and the transfers of one micro-batch run while the other computes. This holds in
the forward AND the backward (the backward runs segment by segment, layer-interleaved over the
micro-batches, the mirror image of the forward). What does not overlap: the first segment of a
wave on the attention side and the last layer's backward of a wave on the MoE side (pipeline
fill and drain, as in any pipeline), the count exchange (the MoE rank must know the sizes
before it can post the receive of the rows: a small blocking message per (layer, micro-batch,
attention rank)), and the gradient sync at the end of the step. With m = 1 the groups take
turns (no overlap): the baseline the pipelined runs are compared with. The transfers hide
completely once m x T_max >= 2 (T_max + T_comm) (MegaScale-Infer), T_max the slower group's
time per layer and micro-batch; the price is m micro-batches' activations held at once.

Gradients: attention parameters are summed over the replicas (the same head shard of every
replica, `sync_gradients`, kind `grad_sync`); inside a replica the replicated parameters' grads
are already complete (the f/g operators). Expert gradients are complete on their MoE rank: it
ran every row routed to its experts from all replicas. Statistics (loss, aux losses, tokens per
expert) are added by head shard 0 of each replica only; aux losses are per micro-batch, as in
`SingleRank`.

Decode: when the prompt batch B is a multiple of attn_replicas, replica r decodes sequences
[r*B/R, (r+1)*B/R) and the MoE ranks serve both replicas' rows in one pass per layer; otherwise
replica 0 decodes the whole batch and the other replicas only take part in the per-token
exchange. After each token every rank joins one all-reduce of the new token ids (each active
replica's head shard 0 contributes its sequences), so all ranks return the same tokens and
their per-token clocks are synchronised.

Failure: every wait on a peer has the configured `parallel.timeout_s`; a dead or silent peer
raises `PeerCommError` naming the transfer (layer, micro-batch, peers) on the ranks waiting for
it, and a rank blocked in a collective instead fails within the same timeout.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from masep.model import Experts, KVCache, MoETransformer, Routing, combine, lm_loss_sum, sort_by_expert
from masep.parallel.base import Generation, GlobalBatch, LocalStats, StaticDecoder, StepStats, Strategy, sync
from masep.parallel.comm import (PendingP2P, all_reduce_sum, gather_uneven_rows, new_group_containing, post_p2p,
                                 scatter_rows, sync_gradients)
from masep.parallel.tp import TPAttention, sync_rng_state, tp_shard

KIND = "moe_dispatch"
# Tags keep the three kinds of message apart on gloo (NCCL ignores tags and relies on order).
TAG_COUNTS, TAG_ROWS, TAG_GRADS = 1, 2, 3

_HEAD_SHARDED = ("attn.qkv.weight", "attn.out.weight")
_EXPERT_PARAMS = ("moe.experts.w_up", "moe.experts.w_down")


@dataclass
class _Route:
    """One layer of one micro-batch on an attention rank: where its rows went, and what the
    combine needs when they come back."""
    tok: torch.Tensor  # [rows] token of each kept assignment, sorted by expert
    weight: torch.Tensor  # [rows] combine weights (a leaf of the next segment while training)
    h: torch.Tensor  # the residual stream after attention (likewise)
    xn_shape: torch.Size  # shape and dtype of the MoE input, which the combined output takes
    xn_dtype: torch.dtype
    share_sizes: list[int]  # rows of the sorted block each head shard of the replica carries
    to_moe: list[tuple[int, int, list[int]]]  # my share per MoE rank: (rank, rows, rows per local expert)
    y_buf: Optional[torch.Tensor] = None  # receives the expert outputs of my share
    y_leaf: Optional[torch.Tensor] = None  # y_buf as the next segment's leaf (training)
    returned: Optional[PendingP2P] = None  # expert outputs on their way back
    gx_buf: Optional[torch.Tensor] = None  # receives the gradient of my share's rows
    grads_back: Optional[PendingP2P] = None
    sent: list[PendingP2P] = field(default_factory=list)

    def offsets(self) -> list[tuple[int, int, int]]:
        """(MoE rank, first row, rows) of my share's block for each MoE rank."""
        out, start = [], 0
        for dst, n, _ in self.to_moe:
            out.append((dst, start, n))
            start += n
        return out


@dataclass
class _Flight:
    """One micro-batch of an attention replica on its way through the segments and back."""
    ids: torch.Tensor
    targets: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    index: int = 0  # micro-batch index inside the replica's step (for error messages)
    routes: dict = field(default_factory=dict)  # layer -> _Route
    outputs: dict = field(default_factory=dict)  # segment -> (tensors, their gradients' sources)
    logits: Optional[torch.Tensor] = None


@dataclass
class _Served:
    """One (layer, micro-batch) on a MoE rank, kept for its backward."""
    senders: list[int]
    sizes: list[int]  # rows from each sender
    x: Optional[torch.Tensor] = None  # received rows (a leaf while training)
    y: Optional[torch.Tensor] = None  # expert outputs, in received order
    sent: Optional[PendingP2P] = None

    def blocks(self):
        start = 0
        for src, n in zip(self.senders, self.sizes):
            yield src, start, n
            start += n


def _waves(n: int, in_flight: int) -> list[range]:
    m = max(1, min(in_flight, n))
    return [range(i, min(i + m, n)) for i in range(0, n, m)]


class MASeparation(Strategy):
    name = "ma_sep"

    def __init__(self, cfg, layout, rank, device, model: MoETransformer):
        super().__init__(cfg, layout, rank, device)
        mc = cfg.model
        self.L, self.E = mc.layers, mc.experts
        self.tp, self.R, self.M = layout.attn_tp, layout.attn_replicas, layout.moe_ranks
        self.n_local = self.E // self.M
        self.attn_ranks, self.moe_ranks = layout.attention_ranks, layout.moe_rank_list
        self.wire_dtype = self.compute_dtype()  # rows travel in the dtype the experts compute in
        self.timeout_s = cfg.parallel.timeout_s
        coords = layout.coords(rank)
        self.is_attention = coords["role"] == "attention"

        # Every rank creates every group, in the same order (torch.distributed requires it).
        timeout = timedelta(seconds=cfg.parallel.timeout_s)
        tp, R = self.tp, self.R
        self.replica_group = new_group_containing(
            rank, [[r * tp + t for t in range(tp)] for r in range(R)], timeout)
        self.shard_group = new_group_containing(
            rank, [[r * tp + t for r in range(R)] for t in range(tp)], timeout)
        everyone = list(range(layout.world_size))
        self.to_moe = dist.new_group(everyone, timeout=timeout)  # attention -> MoE transfers
        self.to_attn = dist.new_group(everyone, timeout=timeout)  # MoE -> attention transfers
        if self.device.type == "cuda":
            # NCCL: batched P2P must not be a group's first operation unless all ranks join it.
            for g in (self.to_moe, self.to_attn):
                dist.all_reduce(torch.zeros(1, device=self.device), group=g)

        if self.is_attention:
            self.replica, self.head_shard = coords["replica"], coords["head_shard"]
            for block in model.blocks:
                with torch.device(self.device):  # uninitialised: the slices are loaded next
                    attn = TPAttention(mc.hidden, mc.heads // tp, mc.head_dim, self.replica_group, tp)
                attn.load_state_dict({k: tp_shard("attn." + k, v, mc, self.head_shard, tp)
                                      for k, v in block.attn.state_dict().items()})
                block.attn = attn
                del block.moe.experts  # they live on the MoE ranks
            self.model = model.to(self.device)
            if tp > 1 and mc.dropout > 0:
                # Residual dropout is replicated inside a replica: one stream for its ranks.
                sync_rng_state(self.replica_group, self.replica * tp, self.device)
        else:
            self.moe_index = coords["moe_index"]
            self.experts = nn.ModuleList()
            for block in model.blocks:
                with torch.device(self.device):
                    ex = Experts(self.n_local, mc.hidden, mc.expert_hidden, mc.expert_activation, mc.expert_dropout)
                ex.load_state_dict({k: tp_shard("moe.experts." + k, v, mc, self.moe_index, self.M)
                                    for k, v in block.moe.experts.state_dict().items()})
                self.experts.append(ex)
            self.experts.to(self.device)

    # ------------------------------------------------------------------ parameters

    def modules(self):
        return [self.model] if self.is_attention else [self.experts]

    def named_parameters(self):
        if self.is_attention:
            return list(self.model.named_parameters())
        return [(f"blocks.{layer}.moe.experts.{n}", p)
                for layer, ex in enumerate(self.experts) for n, p in ex.named_parameters()]

    def replication(self, name: str) -> int:
        if name.endswith(_EXPERT_PARAMS):
            return 1
        return self.R if name.endswith(_HEAD_SHARDED) else self.R * self.tp

    def checkpoint_key(self, name: str) -> str:
        if name.endswith(_EXPERT_PARAMS):
            return f"{name}.moe{self.moe_index}of{self.M}"
        if name.endswith(_HEAD_SHARDED) and self.tp > 1:
            return f"{name}.heads{self.head_shard}of{self.tp}"
        return name

    # ------------------------------------------------------------------ training

    def _my_microbatches(self, batch: GlobalBatch) -> list[GlobalBatch]:
        mbs = batch.microbatches(self.layout.microbatch_size)
        n = self.layout.microbatches
        if len(mbs) != n * self.R:
            raise ValueError(f"ma_sep: the batch has {len(mbs)} micro-batches, the layout expects "
                             f"{n} per replica x {self.R} replicas")
        return mbs[self.replica * n:(self.replica + 1) * n] if self.is_attention else []

    def forward_backward(self, batch: GlobalBatch) -> StepStats:
        batch = batch.to(self.device)
        n_valid = batch.n_valid()
        n_micro = batch.inputs.shape[0] // self.layout.microbatch_size
        stats = LocalStats(self.L, self.E)
        mine = self._my_microbatches(batch)
        waves = _waves(self.layout.microbatches, self.cfg.parallel.microbatches)
        pending: list[PendingP2P] = []
        for wave in waves:
            if self.is_attention:
                flights = [_Flight(mine[i].inputs, mine[i].targets, mine[i].mask, i) for i in wave]
                for s in range(self.L + 1):
                    for f in flights:
                        self._forward_segment(f, s, stats=stats, n_valid=n_valid, n_micro=n_micro)
                for s in reversed(range(self.L + 1)):
                    for f in flights:
                        self._backward_segment(f, s, pending)
            else:
                served = {}
                for layer in range(self.L):
                    for i in wave:
                        where = f"layer {layer} micro-batch {i}"
                        served[layer, i] = self._serve_forward(layer, self.attn_ranks, where)
                for layer in reversed(range(self.L)):
                    for i in wave:
                        where = f"layer {layer} micro-batch {i}"
                        self._serve_backward(served.pop((layer, i)), pending, where)
        for p in pending:
            p.wait()
        params = [p for _, p in self.named_parameters()]
        for p in params:  # a parameter no token reached still has a (zero) gradient, as on one rank
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.is_attention:
            sync_gradients(params, self.shard_group)
        return stats.reduce(n_valid, n_micro, self.device)

    # ---- attention side

    def _forward_segment(self, f: _Flight, s: int, stats: Optional[LocalStats] = None, n_valid: int = 1,
                         n_micro: int = 1, start_pos: int = 0, caches: Optional[list[KVCache]] = None) -> None:
        """Segment s of micro-batch `f` (see the module docstring). Records what the backward
        and the next segment need when gradients are enabled."""
        model, training = self.model, torch.is_grad_enabled()
        with self.autocast():
            x = model.embed(f.ids) if s == 0 else self._combine(f, s - 1)
            if s == self.L:
                f.logits = model.logits(x)
            else:
                block = model.blocks[s]
                h = block.attention_residual(x, model.rope_cos, model.rope_sin, start_pos,
                                             caches[s] if caches is not None else None)
                xn = block.moe_norm(h)
                xn_flat = xn.reshape(-1, xn.shape[-1])
                routing = block.moe.route(xn_flat)
                route = self._sort_and_share(routing, h, xn)
                rows = xn_flat.index_select(0, route.tok).to(self.wire_dtype)
                if self.tp > 1:  # my share; its backward all-gathers the shares' gradients
                    rows = scatter_rows(rows, self.replica_group, route.share_sizes, KIND)
                self._dispatch(route, rows, f"layer {s} micro-batch {f.index}")
                f.routes[s] = route
        if s == self.L:
            if f.targets is not None:
                ce = lm_loss_sum(f.logits, f.targets, f.mask)
                if stats is not None and self.head_shard == 0:
                    stats.add_ce(ce)
                if training:
                    f.outputs[s] = ([ce / max(n_valid, 1)], [None])
            return
        if stats is not None and self.head_shard == 0:
            stats.add_routing(s, routing)
        if training:
            lb_coef, z_coef = self.aux_coefficients()
            aux = (lb_coef * routing.lb_loss + z_coef * routing.z_loss) / n_micro
            # The graph ends here; the next segment starts from leaves holding the same values.
            f.outputs[s] = ([rows, h, route.weight, aux], ["rows", "h", "weight", None])
            route.h = h.detach().requires_grad_()
            route.weight = route.weight.detach().requires_grad_()

    def _sort_and_share(self, routing: Routing, h: torch.Tensor, xn: torch.Tensor) -> _Route:
        """Sort the kept assignments by expert as `masep.model.dispatch_combine` does (its
        `sort_by_expert`; the rows are then in flight while other work runs), and cut the sorted
        block into the replica's per-head-shard shares."""
        o = sort_by_expert(routing, self.E)
        tok, weight = o.tok, o.weight
        per_expert = o.counts.tolist()
        rows = len(tok)
        share_sizes = [rows * (t + 1) // self.tp - rows * t // self.tp for t in range(self.tp)]
        start = rows * self.head_shard // self.tp
        end = start + share_sizes[self.head_shard]
        bounds = [0]
        for c in per_expert:
            bounds.append(bounds[-1] + c)
        to_moe = []
        for j, dst in enumerate(self.moe_ranks):
            counts = [max(0, min(end, bounds[e + 1]) - max(start, bounds[e]))
                      for e in range(j * self.n_local, (j + 1) * self.n_local)]
            to_moe.append((dst, sum(counts), counts))
        return _Route(tok=tok, weight=weight, h=h, xn_shape=xn.shape, xn_dtype=xn.dtype,
                      share_sizes=share_sizes, to_moe=to_moe)

    def _dispatch(self, route: _Route, rows: torch.Tensor, where: str) -> None:
        """Post the counts and rows of my share to the MoE ranks, and the receive of their outputs."""
        counts = [(torch.tensor(c, dtype=torch.long), dst) for dst, _, c in route.to_moe]
        data = rows.detach()
        route.sent.append(post_p2p(counts, [], self.to_moe, KIND, TAG_COUNTS, f"sending counts of {where}",
                                   self.timeout_s))
        route.sent.append(post_p2p([(data[a:a + n], dst) for dst, a, n in route.offsets()], [], self.to_moe,
                                   KIND, TAG_ROWS, f"sending rows of {where}", self.timeout_s))
        route.y_buf = torch.empty_like(data)
        route.returned = post_p2p([], [(route.y_buf[a:a + n], dst) for dst, a, n in route.offsets()],
                                  self.to_attn, KIND, TAG_ROWS, f"receiving expert outputs of {where}",
                                  self.timeout_s)

    def _combine(self, f: _Flight, layer: int) -> torch.Tensor:
        """Wait for the expert outputs of `layer`, weight and sum them per token (the model's
        `combine`) and add the residual (as `Block.moe_residual` does)."""
        route = f.routes[layer]
        route.returned.wait()
        for p in route.sent:
            p.wait()
        route.sent = []
        y = route.y_buf
        if torch.is_grad_enabled():
            y = route.y_leaf = y.requires_grad_()
        if self.tp > 1:
            y = gather_uneven_rows(y, self.replica_group, route.share_sizes, KIND)
        n_tokens = route.xn_shape.numel() // route.xn_shape[-1]
        like = torch.empty((n_tokens, route.xn_shape[-1]), dtype=route.xn_dtype, device=y.device)
        out = combine(y, route.tok, route.weight, like)
        block = self.model.blocks[layer]
        return route.h + F.dropout(out.view(route.xn_shape), block.dropout, block.training)

    def _backward_segment(self, f: _Flight, s: int, pending: list[PendingP2P]) -> None:
        """Backward of segment s of `f`; then send the gradient of the expert outputs it consumed
        (layer s-1) to the MoE ranks and post the receive of their input gradients."""
        tensors, sources = f.outputs.pop(s)
        if s < self.L:
            route = f.routes.pop(s)
            route.grads_back.wait()
            given = {"rows": route.gx_buf, "h": route.h.grad, "weight": route.weight.grad}
            grads = []
            for t, src in zip(tensors, sources):
                g = given[src] if src is not None else None
                grads.append(torch.zeros_like(t) if g is None and t.dim() > 0 else g)
        else:
            grads = [None]
        torch.autograd.backward(tensors, grads)
        if s == 0:
            return
        prev = f.routes[s - 1]
        gy = prev.y_leaf.grad if prev.y_leaf.grad is not None else torch.zeros_like(prev.y_leaf)
        gy = gy.contiguous()
        where = f"layer {s - 1} micro-batch {f.index}"
        pending.append(post_p2p([(gy[a:a + n], dst) for dst, a, n in prev.offsets()], [], self.to_moe, KIND,
                                TAG_GRADS, f"sending output gradients of {where}", self.timeout_s))
        prev.gx_buf = torch.empty_like(gy)
        prev.grads_back = post_p2p([], [(prev.gx_buf[a:a + n], dst) for dst, a, n in prev.offsets()],
                                   self.to_attn, KIND, TAG_GRADS, f"receiving input gradients of {where}",
                                   self.timeout_s)
        prev.y_leaf = prev.y_buf = None

    # ---- MoE side

    def _serve_forward(self, layer: int, senders: list[int], where: str) -> _Served:
        """Receive the rows of one (layer, micro-batch) from `senders`, run the experts on all
        of them at once and post each sender's outputs back."""
        El = self.n_local
        counts = [torch.empty(El, dtype=torch.long) for _ in senders]
        post_p2p([], list(zip(counts, senders)), self.to_moe, KIND, TAG_COUNTS,
                 f"receiving counts of {where}", self.timeout_s).wait()
        per = torch.stack(counts)  # [senders, local experts]
        served = _Served(list(senders), per.sum(1).tolist())
        x = torch.empty((sum(served.sizes), self.cfg.model.hidden), dtype=self.wire_dtype, device=self.device)
        post_p2p([], [(x[a:a + n], src) for src, a, n in served.blocks()], self.to_moe, KIND, TAG_ROWS,
                 f"receiving rows of {where}", self.timeout_s).wait()
        if x.shape[0] == 0:
            return served
        if torch.is_grad_enabled():
            x.requires_grad_()
        expert_of_row = torch.repeat_interleave(torch.arange(El).repeat(len(senders)), per.reshape(-1))
        order = torch.argsort(expert_of_row, stable=True).to(self.device)
        with self.autocast():
            y_sorted = self.experts[layer](x[order], per.sum(0).to(self.device))
        y = y_sorted[torch.argsort(order)].to(self.wire_dtype)
        data = y.detach()
        served.sent = post_p2p([(data[a:a + n], src) for src, a, n in served.blocks()], [], self.to_attn, KIND,
                               TAG_ROWS, f"sending expert outputs of {where}", self.timeout_s)
        served.x, served.y = x, y
        return served

    def _serve_backward(self, served: _Served, pending: list[PendingP2P], where: str) -> None:
        if served.x is None:
            return  # no rows: the attention side sends and expects nothing either
        gy = torch.empty_like(served.y, requires_grad=False)
        post_p2p([], [(gy[a:a + n], src) for src, a, n in served.blocks()], self.to_moe, KIND, TAG_GRADS,
                 f"receiving output gradients of {where}", self.timeout_s).wait()
        torch.autograd.backward(served.y, gy)
        served.sent.wait()
        gx = served.x.grad
        pending.append(post_p2p([(gx[a:a + n], src) for src, a, n in served.blocks()], [], self.to_attn, KIND,
                                TAG_GRADS, f"sending input gradients of {where}", self.timeout_s))

    def _serve_forward_only(self, n_micro: int, senders: list[int], what: str) -> None:
        """Mirror of forward passes without backward: `n_micro` micro-batches, in waves."""
        pending = []
        for wave in _waves(n_micro, self.cfg.parallel.microbatches):
            for layer in range(self.L):
                for i in wave:
                    served = self._serve_forward(layer, senders, f"{what} layer {layer} micro-batch {i}")
                    if served.sent is not None:
                        pending.append(served.sent)
        for p in pending:
            p.wait()

    # ------------------------------------------------------------------ evaluation and decoding

    def _set_training(self, mode: bool) -> list[bool]:
        was = [m.training for m in self.modules()]
        for m in self.modules():
            m.train(mode)
        return was

    def _restore_training(self, was: list[bool]) -> None:
        for m, mode in zip(self.modules(), was):
            m.train(mode)

    @torch.no_grad()
    def evaluate(self, batch: GlobalBatch) -> tuple[float, int]:
        batch = batch.to(self.device)
        was = self._set_training(False)
        ce = torch.zeros((), dtype=torch.float64)
        mine = self._my_microbatches(batch)
        if self.is_attention:
            for wave in _waves(len(mine), self.cfg.parallel.microbatches):
                flights = [_Flight(mine[i].inputs, index=i) for i in wave]
                for s in range(self.L + 1):
                    for f in flights:
                        self._forward_segment(f, s)
                if self.head_shard == 0:  # the replica computed the same numbers: count them once
                    for i, f in zip(wave, flights):
                        ce += lm_loss_sum(f.logits, mine[i].targets, mine[i].mask).double().cpu()
        else:
            self._serve_forward_only(self.layout.microbatches, self.attn_ranks, "evaluation")
        all_reduce_sum(ce)  # statistics: untimed
        self._restore_training(was)
        return float(ce), batch.n_valid()

    def _remote_experts_static(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Expert outputs of all rows (sorted by expert, `counts` per expert) with fixed shapes:
        head shard 0 sends every MoE rank all rows and the counts, each MoE rank computes its
        experts' block (zeros elsewhere), and the sum of the answers is every row's output;
        the other head shards of the replica receive it by broadcast. Decode batches are small,
        so sending all rows to every MoE rank costs little and keeps the sizes static."""
        if self.head_shard == 0:
            x = x_sorted.to(self.wire_dtype).contiguous()
            outs = [torch.empty_like(x) for _ in self.moe_ranks]
            sent = [post_p2p([(counts.contiguous(), d) for d in self.moe_ranks], [], self.to_moe, KIND, TAG_COUNTS,
                             "sending counts of a decode step", self.timeout_s),
                    post_p2p([(x, d) for d in self.moe_ranks], [], self.to_moe, KIND, TAG_ROWS,
                             "sending rows of a decode step", self.timeout_s)]
            post_p2p([], list(zip(outs, self.moe_ranks)), self.to_attn, KIND, TAG_ROWS,
                     "receiving expert outputs of a decode step", self.timeout_s).wait()
            for p in sent:
                p.wait()
            y = outs[0] if len(outs) == 1 else torch.stack(outs).sum(0)  # one nonzero term per row
        else:
            y = torch.empty(x_sorted.shape, dtype=self.wire_dtype, device=x_sorted.device)
        if self.tp > 1:
            dist.broadcast(y, src=self.replica * self.tp, group=self.replica_group)
        return y

    def _serve_decode_step(self, senders: list[tuple[int, int]], what: str) -> None:
        """MoE rank, one decode step: for every layer, the rows of each (sender, rows) pair."""
        first = self.moe_index * self.n_local
        for layer in range(self.L):
            counts = [torch.empty(self.E, dtype=torch.long, device=self.device) for _ in senders]
            xs = [torch.empty((m, self.cfg.model.hidden), dtype=self.wire_dtype, device=self.device)
                  for _, m in senders]
            where = f"{what} layer {layer}"
            post_p2p([], [(c, src) for c, (src, _) in zip(counts, senders)], self.to_moe, KIND, TAG_COUNTS,
                     f"receiving counts of {where}", self.timeout_s).wait()
            post_p2p([], [(x, src) for x, (src, _) in zip(xs, senders)], self.to_moe, KIND, TAG_ROWS,
                     f"receiving rows of {where}", self.timeout_s).wait()
            with self.autocast():
                ys = [self.experts[layer].forward_block(x, c, first).to(self.wire_dtype).contiguous()
                      for x, c in zip(xs, counts)]
            post_p2p([(y, src) for y, (src, _) in zip(ys, senders)], [], self.to_attn, KIND, TAG_ROWS,
                     f"sending expert outputs of {where}", self.timeout_s).wait()

    def _decoding_replicas(self, batch: int) -> int:
        """Replicas that decode: all when they can split the batch evenly, else replica 0 alone."""
        return self.R if batch % self.R == 0 else 1

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> Generation:
        was = self._set_training(False)
        B, T0 = prompt.shape
        active = self._decoding_replicas(B)
        per_replica = B // active
        senders = self.attn_ranks[: active * self.tp]
        decoding = self.is_attention and self.replica < active
        if decoding:
            lo = self.replica * per_replica
            ids = prompt[lo:lo + per_replica].to(self.device)
            mc = self.cfg.model
            caches = [KVCache.empty(per_replica, mc.heads // self.tp, T0 + new_tokens, mc.head_dim,
                                    self.compute_dtype(), self.device) for _ in range(self.L)]

        def step(ids_in: Optional[torch.Tensor], start_pos: int, what: str) -> torch.Tensor:
            """One forward pass of every rank's part; returns the new token of each sequence."""
            new = torch.zeros(B, dtype=torch.long)
            if decoding:
                f = _Flight(ids_in)
                for s in range(self.L + 1):
                    self._forward_segment(f, s, start_pos=start_pos, caches=caches)
                if self.head_shard == 0:
                    new[lo:lo + per_replica] = f.logits[:, -1].argmax(-1).cpu()
            elif not self.is_attention:
                self._serve_forward_only(1, senders, what)
            all_reduce_sum(new)  # every rank gets every token (and the clocks meet here)
            return new

        dist.barrier()  # every rank starts the clock together
        sync(self.device)
        t0 = time.perf_counter()
        next_ids = step(ids if decoding else None, 0, "prefill")
        sync(self.device)
        prefill_s = time.perf_counter() - t0
        # Decoding proper: fixed-shape steps. Head shard 0 of each decoding replica exchanges
        # all top-k rows of its tokens with every MoE rank (see `_remote_experts_static`).
        exchanging = [(r * self.tp, per_replica * self.cfg.model.top_k) for r in range(active)]
        n = new_tokens - 1
        rest = torch.zeros(B, n, dtype=torch.long)
        seen = torch.zeros(n, dtype=torch.float64)  # token latencies: rank 0's, broadcast below
        if decoding:
            with self.autocast():
                decoder = StaticDecoder(lambda i, p: self.model.decode_step(i, p, caches, self._remote_experts_static),
                                        next_ids[lo:lo + per_replica, None].to(self.device),
                                        torch.tensor([T0], device=self.device), cuda_graph=False)
            mine, times = self.stream_tokens(decoder, n)
            seen = torch.tensor(times, dtype=torch.float64)
            if self.head_shard == 0 and n:
                rest[lo:lo + per_replica] = torch.stack(mine, 1)
        elif not self.is_attention:
            for i in range(n):  # no wait between steps: the next step's receives are posted early
                self._serve_decode_step(exchanging, f"token {i + 1}")
        all_reduce_sum(rest)  # every rank gets every token
        # Every rank reports the inter-token latency where the tokens reach a client: at rank 0,
        # head shard 0 of replica 0 (MoE ranks serve without a clock of their own per token).
        dist.broadcast(seen, src=0)
        self._restore_training(was)
        return Generation(torch.cat([next_ids[:, None], rest], 1), prefill_s, seen.tolist())
