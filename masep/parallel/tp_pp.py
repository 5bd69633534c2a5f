"""Tensor plus pipeline parallelism (`tp_pp`): the paper's TP=8 + PP=2 baseline.

What is split
  The layers are cut into `pp` contiguous pipeline stages exactly as in `pp` (stage 0 also holds
  the embedding, the last stage the final norm and head), and every stage is a tensor-parallel
  group of `tp` ranks holding its layers as `masep.parallel.sharding` shards them: each rank keeps its
  heads (column-parallel qkv, row-parallel output projection, its heads' KV cache) and
  experts / tp of the experts; embedding, norms, routers and head are replicated inside the
  group. dp = world / (tp * pp) replicas of the whole pipeline take contiguous blocks of the
  global batch's micro-batches. Rank = (dp_index * pp + stage) * tp + tp_index (tp innermost,
  so a TP group sits on neighbouring GPUs).

Schedule: the 1F1B schedule of `masep.parallel.pp.PipelineParallel`, run by every rank of a
  stage in lockstep (they hold the same activations), with the same loss and aux-loss handling.

Communication (kinds as recorded through `comm_timer()`):
  attn_allreduce  inside a stage: the attention's forward sum and input-gradient sum (sharding.py).
  moe_dispatch    inside a stage: the all-reduce completing the MoE combine and its backward
                  counterpart (sharding.py; TP routes replicated tokens, no all-to-all).
  p2p             between stages, TP rank j of stage s talks only to TP rank j of stage s + 1:
                  the activations and their gradients are replicated over the TP group (they
                  leave the stage after its all-reduces), so every TP rank sends its own copy.
                  That costs tp times the inter-stage bytes of sending once and broadcasting
                  inside the next stage, but adds no collective to the critical path and keeps
                  each rank's schedule independent of its TP peers' timing; on one NVLink host
                  the copies travel on distinct links. In `generate`, the new token's broadcast
                  from the last stage over each (replica, TP rank) pipeline group.
  grad_sync       gradients summed over the data-parallel group (same stage and TP rank in
                  every replica), and the tied embedding's over first and last stage.

Bubble: as in `pp` (the waits sit inside the `p2p` time; `last_schedule` splits compute, P2P
  and wall time of the schedule).

Statistics (losses, routing counts) are added by TP rank 0 of each stage only: the group's
ranks compute the same replicated numbers. Decoding: as in `pp`, per replica; each TP rank of
the last stage picks the same token from the replicated head and broadcasts it down its own
pipeline group.
"""
from __future__ import annotations

from datetime import timedelta

from torch import nn

from masep.model import MoETransformer
from masep.parallel.comm import new_group_containing
from masep.parallel.pp import PipelineParallel
from masep.parallel.sharding import Stage, is_tp_sharded, shard_blocks, sync_rng_state


class TensorPipelineParallel(PipelineParallel):
    name = "tp_pp"

    def __init__(self, cfg, layout, rank, device, model: MoETransformer):
        super().__init__(cfg, layout, rank, device, model)
        if layout.tp > 1 and cfg.model.dropout > 0:
            # Replicated residual dropout must draw the same masks on every rank of the stage.
            sync_rng_state(self.tp_group, layout.rank_of(self.replica, self.stage, 0), self.device)

    def _make_groups(self) -> None:
        super()._make_groups()
        lo = self.layout
        self.tp_group = new_group_containing(
            self.rank, [[lo.rank_of(d, s, t) for t in range(lo.tp)] for d in range(lo.dp) for s in range(lo.pp)],
            timedelta(seconds=self.cfg.parallel.timeout_s))

    def build_stage(self, model: MoETransformer) -> nn.Module:
        shards = shard_blocks(model, self.layer_ids, self.tp_group, self.tp_index, self.layout.tp)
        return Stage(model, self.layer_ids, self.is_first, self.is_last, shards)

    def tp_replication(self, name: str) -> int:
        return 1 if is_tp_sharded(name) else self.layout.tp

    def checkpoint_key(self, name: str) -> str:
        return f"{name}.tp{self.tp_index}of{self.layout.tp}" if is_tp_sharded(name) else name

    def adds_stats(self) -> bool:
        return self.tp_index == 0
