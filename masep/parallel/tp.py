"""Tensor parallelism (Megatron-LM style) inside groups of `tp` ranks, data parallelism across
the groups: strategy `tp` (the paper's TP=8 baseline, DP = world / tp).

Layout (masep.parallel.layout): rank = dp_index * tp + tp_index, so a TP group is `tp`
neighbouring ranks and a DP group is the ranks with the same tp_index.

What is split inside a TP group: each rank holds its heads and E/tp of the experts, everything
else is replicated (masep/parallel/sharding.py says how, and which communication it costs).

Data parallelism: replica d takes the contiguous block d of the global batch's micro-batches
(`layout.microbatches` of them); after the backward every gradient is summed over the DP group
with `sync_gradients` (kind `grad_sync`). Global-batch semantics (loss normalisation, aux
losses per micro-batch, gradient sums) are those of masep/parallel/base.py, so a step computes
what `SingleRank` computes. `replication(name)` is dp for head/expert shards and tp * dp for
the replicated parameters; statistics are added by the TP-rank 0 of each replica only.

Decode: every rank of a TP group decodes the whole prompt batch with its heads' shard of the KV
cache; every DP replica decodes it too (no cross-replica traffic inside the timed loop, so the
per-token times are those of one TP group serving the batch, which is what TP's TPOT means),
and rank 0 answers for every sequence, so every rank returns the same tokens.

Dropout: the constructor gives a TP group one RNG stream for its replicated dropout when
`model.dropout > 0` (`sync_rng_state`); expert dropout draws from private streams (sharding.py).
"""
from __future__ import annotations

from datetime import timedelta

from masep.model import MoETransformer
from masep.parallel.base import Strategy
from masep.parallel.comm import new_group_containing, sync_gradients
from masep.parallel.sharding import Stage, is_tp_sharded, shard_blocks, sync_rng_state


class TensorParallel(Strategy):
    name = "tp"

    def __init__(self, cfg, layout, rank, device, model: MoETransformer):
        super().__init__(cfg, layout, rank, device)
        coords = layout.coords(rank)
        self.replica, self.tp_rank = coords["dp"], coords["tp"]
        tp, self.replicas = layout.tp, layout.dp
        timeout = timedelta(seconds=cfg.parallel.timeout_s)
        # Every rank creates every group, in the same order (torch.distributed requires it).
        self.tp_group = new_group_containing(
            rank, [[layout.rank_of(d, 0, t) for t in range(tp)] for d in range(layout.dp)], timeout)
        self.dp_group = new_group_containing(
            rank, [[layout.rank_of(d, 0, t) for d in range(layout.dp)] for t in range(tp)], timeout)
        layers = range(cfg.model.layers)
        self.stage = Stage(model, layers, True, True, shard_blocks(model, layers, self.tp_group, self.tp_rank, tp))
        self.stage.to(self.device)
        if tp > 1 and cfg.model.dropout > 0:
            sync_rng_state(self.tp_group, layout.rank_of(self.replica, 0, 0), self.device)

    def modules(self):
        return [self.stage]

    def replication(self, name: str) -> int:
        return self.layout.dp if is_tp_sharded(name) else self.layout.dp * self.layout.tp

    def checkpoint_key(self, name: str) -> str:
        return f"{name}.tp{self.tp_rank}of{self.layout.tp}" if is_tp_sharded(name) else name

    def adds_stats(self) -> bool:
        return self.tp_rank == 0  # the group computes the same numbers: count them once

    def forward(self, mb):
        x, routings = self.stage.run_layers(self.stage.embed(mb.inputs), mask=mb.mask)
        return self.stage.logits(x), [r for _, r in routings]

    def reduce_gradients(self) -> None:
        sync_gradients([p for _, p in self.named_parameters()], self.dp_group)

    # Decoding: every replica decodes the whole batch; rank 0 answers.
    def new_caches(self, batch, max_len):
        return self.stage.new_caches(batch, max_len, self.compute_dtype(), self.device)

    def prefill(self, ids, caches):
        x, _ = self.stage.run_layers(self.stage.embed(ids), 0, caches)
        return self.stage.logits(x[:, -1:])[:, -1].argmax(-1)

    def decode_step(self, ids, pos, caches):
        return self.stage.logits(self.stage.decode_layers(self.stage.embed(ids), pos, caches))[:, -1].argmax(-1)

    def cuda_graph(self) -> bool:
        # Capturing NCCL collectives in a CUDA graph has not been verified on GPUs here yet:
        # only a TP group of one rank replays its step as a graph.
        return self.cfg.infer.cuda_graph and self.device.type == "cuda" and self.layout.tp == 1
