"""Expert parallelism over all ranks with data-parallel attention: strategy `ep_dp` (the
baseline the field uses, e.g. DeepSpeed-MoE / GShard).

What is split: the experts. With W ranks and E experts, rank r holds experts
[r*E/W, (r+1)*E/W) of every layer (`EPExperts`).
What is replicated: everything else -- embedding, attention, norms, routers, head -- on every
rank. Each rank is a data-parallel replica: it takes the contiguous block r of the global
batch's micro-batches (`layout.microbatches` of them) and routes its own tokens.

The MoE layer on a rank (inside `dispatch_combine`, which hands the experts every kept
assignment sorted by expert, hence grouped by the rank holding the expert):
1. `exchange_counts` of the [W, E/W] matrix of assignments per (destination rank, local
   expert), so each rank knows how many rows it receives from each source, and for which of its
   experts (kind `moe_dispatch`);
2. `all_to_all` of the rows (the dispatch, kind `moe_dispatch`); the receiver sorts them by
   local expert and runs its experts;
3. `all_to_all` of the outputs back to their sources (the combine, kind `moe_dispatch`), which
   then weight and sum them per token.
The autograd all-to-all sends gradients back the same way (the same kind), so every expert's
gradient is complete -- summed over all the tokens of the world that chose it -- without any
further sync. The replicated parameters' gradients are summed over the world with
`sync_gradients` (kind `grad_sync`). Rows travel in the compute dtype (bf16 under autocast,
where the expert matrix products would cast them anyway), so sender and receiver agree.

Every rank must join each collective the same number of times, forward and backward: in
training every rank runs the same number of micro-batches (the layout checks it); where work
is uneven (evaluation of a batch that does not split evenly, decoding) a rank without tokens
still serves its experts through an empty exchange per layer (`serve_prefill`).

Capacity: routing happens on the routing rank over one micro-batch's tokens, exactly as on one
rank, so capacity drops -- and therefore parity with `SingleRank` -- are the same with a
capacity factor and dropless. Global-batch semantics: masep/parallel/base.py; statistics are
added by the rank that routed the tokens.

Decode: routing (and a capacity factor) sees the whole batch of one forward. Dropless routing
is per token, so the prompt batch's sequences are shared out over the ranks like data
parallelism; with a capacity factor rank 0 decodes the whole batch, so the same tokens compete
for capacity as on one rank. Ranks without sequences serve their experts each step; the tokens
are summed over the world at the end, so every rank returns them all.
"""
from __future__ import annotations

from contextlib import contextmanager
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from masep.model import Experts, MoETransformer
from masep.parallel.base import Strategy
from masep.parallel.comm import all_to_all, exchange_counts, new_group_containing, post_p2p, sync_gradients


class EPExperts(Experts):
    """This rank's experts, serving the assignments of every rank through all-to-all."""

    def __init__(self, n_local: int, hidden: int, ffn: int, activation: str, dropout: float, *,
                 world: int, rank: int, group, wire_dtype: torch.dtype):
        super().__init__(n_local, hidden, ffn, activation, dropout)
        self.world, self.rank, self.group, self.wire_dtype = world, rank, group, wire_dtype
        # Decode steps: rows each rank sends per layer (all its tokens' top-k), else None.
        self.static_rows: Optional[list[int]] = None

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted: every kept assignment of this rank's tokens, sorted by (global) expert;
        counts [E]: assignments per expert. Returns the expert outputs in the same order."""
        if self.static_rows is not None:
            return self._forward_static(x_sorted, counts)
        n_local = self.n_experts
        send = counts.view(self.world, n_local)
        recv = exchange_counts(counts, self.group, "moe_dispatch").view(self.world, n_local)
        to_rank, from_rank = send.sum(1).tolist(), recv.sum(1).tolist()
        x_recv = all_to_all(x_sorted.to(self.wire_dtype), from_rank, to_rank, self.group, "moe_dispatch")
        # Received rows are grouped by source, then by local expert: regroup them by expert.
        local_expert = torch.arange(n_local, device=counts.device).repeat(self.world)
        order = torch.argsort(torch.repeat_interleave(local_expert, recv.reshape(-1)), stable=True)
        y = super().forward(x_recv[order], recv.sum(0))
        y_recv = torch.empty_like(y).index_copy(0, order, y)  # back to arrival order
        return all_to_all(y_recv.to(self.wire_dtype), to_rank, from_rank, self.group, "moe_dispatch")

    def _forward_static(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Fixed shapes (decode steps): every rank with rows sends all of them (sorted by expert,
        with the counts) to every other rank; each rank computes its experts' block of every
        source's rows (zeros elsewhere) and sends it back; a source sums the answers, one nonzero
        term per row. A rank without rows serves with an empty `x_sorted`."""
        rows, me, first = self.static_rows, self.rank, self.rank * self.n_experts
        peers = [r for r in range(self.world) if r != me and rows[r]]
        hidden = self.w_down.shape[-1]
        x = x_sorted.to(self.wire_dtype).contiguous()
        counts_in = {r: torch.empty_like(counts) for r in peers}
        x_in = {r: torch.empty((rows[r], hidden), dtype=self.wire_dtype, device=x.device) for r in peers}
        to = [r for r in range(self.world) if r != me] if rows[me] else []
        post_p2p([(counts.contiguous(), r) for r in to] + [(x, r) for r in to],
                 [(counts_in[r], r) for r in peers] + [(x_in[r], r) for r in peers],
                 self.group, "moe_dispatch", 0, "exchanging rows of a decode step").wait()
        served = {r: self.forward_block(x_in[r], counts_in[r], first).to(self.wire_dtype).contiguous()
                  for r in peers}
        answers = [torch.empty_like(x) for _ in to]
        post_p2p(list((served[r], r) for r in peers), list(zip(answers, to)), self.group, "moe_dispatch", 0,
                 "returning expert outputs of a decode step").wait()
        if not rows[me]:
            return x
        return sum(answers, self.forward_block(x, counts, first).to(self.wire_dtype))


class ExpertDataParallel(Strategy):
    name = "ep_dp"

    def __init__(self, cfg, layout, rank, device, model: MoETransformer):
        super().__init__(cfg, layout, rank, device)
        m = cfg.model
        self.world = self.replicas = layout.world_size
        self.replica = rank
        # A group of its own so that collectives give up after parallel.timeout_s.
        self.group = (new_group_containing(rank, [list(range(self.world))],
                                           timedelta(seconds=cfg.parallel.timeout_s))
                      if dist.is_initialized() else None)
        n_local = m.experts // self.world
        first = rank * n_local
        for block in model.blocks:  # take ownership: swap the full experts for this rank's slice
            full = block.moe.experts
            with torch.device("meta"):
                mine = EPExperts(n_local, m.hidden, m.expert_hidden, m.expert_activation, m.expert_dropout,
                                 world=self.world, rank=rank, group=self.group,
                                 wire_dtype=self.compute_dtype())
            mine.to_empty(device=full.w_up.device)
            mine.load_state_dict({"w_up": full.w_up[first:first + n_local],
                                  "w_down": full.w_down[first:first + n_local]})
            block.moe.experts = mine
        self.model = model.to(self.device)

    def modules(self):
        return [self.model]

    @staticmethod
    def is_expert(name: str) -> bool:
        return name.endswith(("moe.experts.w_up", "moe.experts.w_down"))

    def replication(self, name: str) -> int:
        return 1 if self.is_expert(name) else self.world

    def checkpoint_key(self, name: str) -> str:
        return f"{name}.ep{self.rank}of{self.world}" if self.is_expert(name) else name

    def forward(self, mb):
        return self.model(mb.inputs, mask=mb.mask)

    def reduce_gradients(self) -> None:
        sync_gradients([p for name, p in self.named_parameters() if not self.is_expert(name)], self.group)

    def forward_only(self, mbs, loss) -> None:
        """As many forwards as the busiest rank: without a micro-batch, serve the experts."""
        super().forward_only(mbs, loss)
        for _ in range(-(-loss.n_micro // self.world) - len(mbs)):
            self.serve_prefill(0)

    def serve_prefill(self, batch: int) -> None:
        """Join one forward's exchanges with no tokens of our own (others' still arrive)."""
        hidden, E = self.cfg.model.hidden, self.cfg.model.experts
        empty = torch.empty(0, hidden, dtype=self.compute_dtype(), device=self.device)
        no_counts = torch.zeros(E, dtype=torch.long, device=self.device)
        with self.autocast():
            for block in self.model.blocks:
                block.moe.experts(empty, no_counts)

    def serve_decode(self, n: int, batch: int) -> list[float]:
        return self.timed_tokens(lambda _: self.serve_prefill(batch), n)[1]

    def decode_rows(self, batch: int, rank: Optional[int] = None) -> slice:
        rank = self.rank if rank is None else rank
        if self.cfg.model.capacity_factor is not None:
            return slice(0, batch if rank == 0 else 0)
        return slice(rank * batch // self.world, (rank + 1) * batch // self.world)

    def answers(self) -> bool:
        return True  # each row is decoded by one rank

    def new_caches(self, batch, max_len):
        return self.model.new_caches(batch, max_len, dtype=self.compute_dtype())

    def prefill(self, ids, caches):
        return self.model(ids, 0, caches, last_only=True)[0][:, -1].argmax(-1)

    def decode_step(self, ids, pos, caches):
        return self.model.decode_step(ids, pos, caches)

    @contextmanager
    def decoding(self, batch: int):
        """Fixed-shape steps: every rank learns how many rows each rank sends."""
        k = self.cfg.model.top_k
        rows = [(sl.stop - sl.start) * k for sl in (self.decode_rows(batch, r) for r in range(self.world))]
        for block in self.model.blocks:
            block.moe.experts.static_rows = rows
        try:
            yield
        finally:
            for block in self.model.blocks:
                block.moe.experts.static_rows = None
