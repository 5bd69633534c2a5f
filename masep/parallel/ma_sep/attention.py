"""The attention side of MA Separation: replica r, head shard t holds the embedding, every
layer's norms, router and its shard of the attention heads (fused qkv rows and output-projection
columns of heads [t*h/attn_tp, (t+1)*h/attn_tp), Megatron column/row parallel: `copy_to_group`
/ `reduce_from_group` inside the replica, kind `attn_allreduce`), the final norm and the output
head (with `ma.head_split`, its vocabulary rows [0, cut): head.py). It runs the segments of the
schedule (protocol.py) and sends its rows to the experts."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from masep.model import KVCache, MoETransformer, Routing, combine, routed_positions, sort_by_expert
from masep.parallel.base import GlobalBatch, LossTerms
from masep.parallel.comm import PendingP2P, gather_uneven_rows, scatter_rows, sync_gradients
from masep.parallel.ma_sep.head import head_backward, head_forward
from masep.parallel.ma_sep.protocol import (KIND, MASepRank, _Flight, _Route, dispatch, remote_experts_static,
                                            send_output_grads, waves)
from masep.parallel.sharding import TPAttention, sync_rng_state, tp_shard

_HEAD_SHARDED = ("attn.qkv.weight", "attn.out.weight")


class AttentionRank(MASepRank):
    def __init__(self, cfg, layout, rank, device, model: MoETransformer):
        super().__init__(cfg, layout, rank, device)
        mc, tp = cfg.model, self.tp
        coords = layout.coords(rank)
        self.replica, self.head_shard = coords["replica"], coords["head_shard"]
        for block in model.blocks:
            with torch.device(self.device):  # uninitialised: the slices are loaded next
                attn = TPAttention(mc.hidden, mc.heads // tp, mc.head_dim, self.replica_group, tp)
            attn.load_state_dict({k: tp_shard("attn." + k, v, mc, self.head_shard, tp)
                                  for k, v in block.attn.state_dict().items()})
            block.attn = attn
            del block.moe.experts  # they live on the MoE ranks
        self.model = model.to(self.device)
        if self.head_split is not None:
            self.head_split.keep_owned(self.model.head.weight)
        if tp > 1 and mc.dropout > 0:
            # Residual dropout is replicated inside a replica: one stream for its ranks.
            sync_rng_state(self.replica_group, self.replica * tp, self.device)

    def modules(self):
        return [self.model]

    def replication(self, name: str) -> int:
        return self.R if name.endswith(_HEAD_SHARDED) else self.R * self.tp

    def checkpoint_key(self, name: str) -> str:
        if name.endswith(_HEAD_SHARDED) and self.tp > 1:
            return f"{name}.heads{self.head_shard}of{self.tp}"
        return name

    def adds_stats(self) -> bool:
        return self.head_shard == 0  # the replica computes the same numbers: count them once

    # ------------------------------------------------------------------ training

    def _forward_wave(self, mbs: list[GlobalBatch], wave: range, loss: LossTerms) -> list[_Flight]:
        flights = [_Flight(mbs[i].inputs, mbs[i], i, routed_positions(mbs[i].mask)) for i in wave]
        for s in range(self.L + 1):
            for f in flights:
                self._forward_segment(f, s, loss)
        return flights

    def run_schedule(self, mbs, loss) -> None:
        pending: list[PendingP2P] = []
        for wave in waves(len(mbs), self.in_flight):
            flights = self._forward_wave(mbs, wave, loss)
            for s in reversed(range(self.L + 1)):
                for f in flights:
                    self._backward_segment(f, s, pending)
        for p in pending:
            p.wait()

    def forward_only(self, mbs, loss) -> None:
        for wave in waves(len(mbs), self.in_flight):
            self._forward_wave(mbs, wave, loss)

    def reduce_gradients(self) -> None:
        sync_gradients([p for _, p in self.named_parameters()], self.shard_group)
        if self.head_split is not None:  # int8's error feedback may carry mass of rows that moved away
            self.head_split.keep_owned(self.model.head.weight.grad)

    def head_weight(self):
        return self.model.head.weight

    def _forward_segment(self, f: _Flight, s: int, loss: Optional[LossTerms] = None, start_pos: int = 0,
                         caches: Optional[list[KVCache]] = None) -> None:
        """Segment s of micro-batch `f` (see protocol.py). Records what the backward and the
        next segment need when gradients are enabled."""
        model, training = self.model, torch.is_grad_enabled()
        with self.autocast():
            x = model.embed(f.ids) if s == 0 else self._combine(f, s - 1)
            if s == self.L and loss is not None and self.head_split is not None:
                f.head, ce = head_forward(self, model.norm(x), f.mb.targets, f"micro-batch {f.index}")
            elif s == self.L:
                f.logits = model.logits(x)
            else:
                block = model.blocks[s]
                h = block.attention_residual(x, model.rope_cos, model.rope_sin, start_pos,
                                             caches[s] if caches is not None else None)
                xn = block.moe_norm(h)
                xn_flat = xn.reshape(-1, xn.shape[-1])
                routing = block.moe.route(xn_flat, f.valid)
                route = self._sort_and_share(routing, h, xn)
                rows = xn_flat.index_select(0, route.tok).to(self.wire_dtype)
                if self.tp > 1:  # my share; its backward all-gathers the shares' gradients
                    rows = scatter_rows(rows, self.replica_group, route.share_sizes, KIND)
                dispatch(self, route, rows, f"layer {s} micro-batch {f.index}")
                f.routes[s] = route
        if loss is None:
            return
        if s == self.L:
            term = loss((), f.logits, f.mb, None if f.head is None else (ce * f.mb.mask.reshape(-1)).sum())
            if training:
                f.outputs[s] = ([term], [None])
            return
        aux = loss([(s, routing)])
        if training:
            # The graph ends here; the next segment starts from leaves holding the same values.
            f.outputs[s] = ([rows, h, route.weight, aux], ["rows", "h", "weight", None])
            route.h = h.detach().requires_grad_()
            route.weight = route.weight.detach().requires_grad_()

    def _sort_and_share(self, routing: Routing, h: torch.Tensor, xn: torch.Tensor) -> _Route:
        """Sort the kept assignments by slot (by expert, as `masep.model.dispatch_combine` does,
        until the balancer moves experts; `sort_by_expert` on slots), and cut the sorted block
        into the replica's per-head-shard shares."""
        o = sort_by_expert(dataclasses.replace(routing, expert=self.slot_of[routing.expert]), self.E)
        rows = len(o.tok)
        share_sizes = [rows * (t + 1) // self.tp - rows * t // self.tp for t in range(self.tp)]
        start = rows * self.head_shard // self.tp
        end = start + share_sizes[self.head_shard]
        bounds = [0]
        for c in o.counts.tolist():
            bounds.append(bounds[-1] + c)
        to_moe = []
        for j, dst in enumerate(self.moe_ranks):
            first = self.first_slot(j)
            counts = [max(0, min(end, bounds[e + 1]) - max(start, bounds[e]))
                      for e in range(first, first + self.rows_of(j))]
            to_moe.append((dst, sum(counts), counts))
        return _Route(tok=o.tok, weight=o.weight, h=h, xn_shape=xn.shape, xn_dtype=xn.dtype,
                      share_sizes=share_sizes, to_moe=to_moe)

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
        if s == self.L and f.head is not None:
            head_backward(self, f.head, f"micro-batch {f.index}")
        if s > 0:
            pending.append(send_output_grads(self, f.routes[s - 1], f"layer {s - 1} micro-batch {f.index}"))

    # ------------------------------------------------------------------ decoding

    def decode_rows(self, batch: int) -> slice:
        active = self.decoding_replicas(batch)
        per = batch // active
        return slice(self.replica * per, (self.replica + 1) * per) if self.replica < active else slice(0, 0)

    def answers(self) -> bool:
        return self.head_shard == 0

    def new_caches(self, batch, max_len):
        mc = self.cfg.model
        return [KVCache.empty(batch, mc.heads // self.tp, max_len, mc.head_dim, self.compute_dtype(), self.device)
                for _ in range(self.L)]

    def prefill(self, ids, caches):
        f = _Flight(ids)
        for s in range(self.L + 1):
            self._forward_segment(f, s, start_pos=0, caches=caches)
        return f.logits[:, -1].argmax(-1)

    def decode_step(self, ids, pos, caches):
        return self.model.decode_step(ids, pos, caches, self._remote_experts_static)

    def _remote_experts_static(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Head shard 0 exchanges the rows, re-sorted by slot, with the MoE ranks
        (`remote_experts_static`); the replica's other head shards receive the outputs by broadcast."""
        experts = torch.arange(self.E, device=counts.device)
        slot_order = torch.argsort(self.slot_of[experts.repeat_interleave(counts, output_size=x_sorted.shape[0])],
                                   stable=True)
        if self.head_shard == 0:
            y = remote_experts_static(self, x_sorted[slot_order], counts[torch.argsort(self.slot_of)])
        else:
            y = torch.empty(x_sorted.shape, dtype=self.wire_dtype, device=x_sorted.device)
        if self.tp > 1:
            dist.broadcast(y, src=self.replica * self.tp, group=self.replica_group)
        return torch.empty_like(y).index_copy_(0, slot_order, y)
