"""Pipeline parallelism (`pp`): the paper's PP=2 baseline, with data parallelism across replicas.

What is split
  The model's layers are cut into `pp` contiguous stages of layers / pp blocks each. Stage 0
  also holds the token embedding, the last stage the final norm and the output head (with tied
  embeddings both ends hold a copy of the one matrix and sum its gradient). The world holds
  dp = world / pp replicas of this pipeline (rank = dp_index * pp + stage). Replica d takes
  micro-batches [d * M, (d + 1) * M) of the global batch, M = `layout.microbatches` (the
  global batch's micro-batches over the replicas: train.global_batch / train.micro_batch / dp).

Schedule (per replica, per optimizer step): 1F1B as in Megatron-LM (non-interleaved).
  Stage s runs min(pp - s - 1, M) warm-up forwards, then alternates one forward and one
  backward, then runs the remaining backwards (cool-down). At most pp - s micro-batches are in
  flight on stage s, whatever M is. Forward-only work (evaluate) runs the micro-batches through
  the stages one after the other.

Losses (identical to SingleRank, `LossTerms` in base.py): the last stage's term holds the
  cross-entropy; every stage adds its own layers' aux-loss term for each micro-batch to its
  backward: a stage calls backward on [output, aux] with gradients
  [gradient received from the next stage, 1], so the aux-loss gradient flows through this
  stage's routers and, with the output gradient, back into the earlier stages.

Communication (each call timed under its kind through `comm_timer()`):
  p2p        activations forward and activation gradients backward between neighbouring stages
             of one replica (`comm.p2p_exchange`, batched isend/irecv; a send and the receive
             that the schedule needs next are posted together, as Megatron's
             send_forward_recv_backward / send_backward_recv_forward, so no pair waits on
             itself); in `generate`, also the broadcast of each new token from the last stage
             to the replica's other stages.
  grad_sync  after the schedule, gradients summed over the stage's data-parallel group (the
             same stage in every replica), and the tied embedding's over first and last stage.

Bubble: a stage with nothing to do waits inside a blocking P2P exchange for its neighbour, so
  the time it idles is part of the `p2p` total of the step (the rest is the transfer itself,
  microseconds for these activations on one host). In the trainer's step rows the bubble is
  therefore inside `comm_p2p_s`, not in `idle_s` (the wait for the slowest rank after the
  step) nor in `compute_s`. `last_schedule` holds the per-step split:
  the seconds spent in this stage's own forward/backward compute, in P2P waits (transfer plus
  bubble) and the schedule's wall time, next to the textbook bubble share
  (pp - 1) / (M + pp - 1) for comparison, and the most micro-batches whose activations the
  stage held at once (pp - s under 1F1B: the activation-memory bound).

Decoding: every replica decodes the whole prompt batch (one request stream per replica, as a
  served PP deployment runs; no cross-replica traffic inside the timed loop, so the per-token
  times are those of one pipeline serving the batch). The prompt goes through the stages in one
  piece; each stage keeps the KV caches of its own layers; the last stage picks the next token
  and broadcasts it over the replica's pipeline group (the first stage needs it to embed the
  next step; the others return it), which also synchronises every stage per token. Rank 0
  answers for every sequence, so every rank returns the same tokens.

Evaluation: forward only, micro-batch by micro-batch through the stages of each replica; the
  last stages' cross-entropy sums are added over the world.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from masep.model import MoETransformer
from masep.parallel.base import GlobalBatch, LossTerms, Strategy, sync
from masep.parallel.comm import new_group_containing, p2p_exchange, sync_gradients
from masep.parallel.sharding import Stage
from masep.telemetry.timing import comm_timer


@dataclass
class ScheduleTiming:
    """Where one stage's schedule time went in the last `forward_backward` (seconds)."""
    wall_s: float  # the schedule, from the first forward to the last backward
    compute_s: float  # this stage's own forward and backward steps
    p2p_s: float  # inside P2P exchanges: transfer plus waiting for a neighbour (the bubble)
    ideal_bubble: float  # (pp - 1) / (M + pp - 1), the 1F1B bubble share with equal stages
    max_in_flight: int  # most micro-batches whose activations this stage held at once


class PipelineParallel(Strategy):
    name = "pp"

    def __init__(self, cfg, layout, rank, device, model: MoETransformer):
        super().__init__(cfg, layout, rank, device)
        c = layout.coords(rank)
        self.stage, self.replica, self.tp_index = c["stage"], c["dp"], c["tp"]
        self.replicas, self.n_stages = layout.dp, layout.pp
        self.is_first, self.is_last = self.stage == 0, self.stage == layout.pp - 1
        per_stage = cfg.model.layers // layout.pp
        self.layer_ids = list(range(self.stage * per_stage, (self.stage + 1) * per_stage))
        self.timeout_s = cfg.parallel.timeout_s
        self.tied = cfg.model.tie_embeddings and layout.pp > 1
        self.prev_rank = None if self.is_first else layout.rank_of(self.replica, self.stage - 1, self.tp_index)
        self.next_rank = None if self.is_last else layout.rank_of(self.replica, self.stage + 1, self.tp_index)
        self.last_rank = layout.rank_of(self.replica, layout.pp - 1, self.tp_index)
        self._make_groups()
        self.stage_module = self.build_stage(model).to(self.device)
        self.last_schedule: Optional[ScheduleTiming] = None

    # ------------------------------------------------------------------ construction

    def _make_groups(self) -> None:
        lo, timeout = self.layout, timedelta(seconds=self.cfg.parallel.timeout_s)
        dp, pp, tp = lo.dp, lo.pp, lo.tp
        # Every rank creates every group, in the same order (torch.distributed requires it).
        self.dp_group = new_group_containing(
            self.rank, [[lo.rank_of(d, s, t) for d in range(dp)] for s in range(pp) for t in range(tp)], timeout)
        self.pipe_group = new_group_containing(
            self.rank, [[lo.rank_of(d, s, t) for s in range(pp)] for d in range(dp) for t in range(tp)], timeout)
        self.tie_group = None
        if self.tied:
            self.tie_group = new_group_containing(
                self.rank, [[lo.rank_of(d, 0, t), lo.rank_of(d, pp - 1, t)] for d in range(dp) for t in range(tp)],
                timeout)
        if pp > 1:
            # One collective on the pipeline group before any batched P2P on it: NCCL requires
            # the group's first call to involve all its ranks (see dist.batch_isend_irecv).
            dist.barrier(group=self.pipe_group)

    def build_stage(self, model: MoETransformer) -> nn.Module:
        """This rank's share of the model (subclasses split it further)."""
        return Stage(model, self.layer_ids, self.is_first, self.is_last)

    # ------------------------------------------------------------------ what the stage holds

    def modules(self):
        return [self.stage_module]

    def named_parameters(self):
        # The full model names the tied matrix once, as the embedding: so do we.
        return [("embed.weight" if self.tied and name == "head.weight" else name, p)
                for name, p in self.stage_module.named_parameters()]

    def replication(self, name: str) -> int:
        copies = self.layout.dp * self.tp_replication(name)
        return copies * 2 if self.tied and name == "embed.weight" else copies

    def tp_replication(self, name: str) -> int:
        """Copies of `name` inside one stage (1 here; the TP group's copies in tp_pp)."""
        return 1

    def _act_shape(self, mb: GlobalBatch) -> tuple[int, ...]:
        return (mb.inputs.shape[0], mb.inputs.shape[1], self.cfg.model.hidden)

    def _act_dtype(self) -> torch.dtype:
        # The residual stream keeps the embedding's dtype under autocast: fp32 when training,
        # bf16 once `cast_parameters` has made the serving weights bf16 (all stages alike).
        return next(self.stage_module.parameters()).dtype

    # ------------------------------------------------------------------ P2P

    def _exchange(self, send: Optional[torch.Tensor], send_to: Optional[int],
                  recv_shape: Optional[tuple], recv_from: Optional[int]) -> Optional[torch.Tensor]:
        """Send `send` to `send_to` and receive a tensor of `recv_shape` from `recv_from`, posted
        together; either side may be absent (no neighbour there)."""
        sends = [(send.detach().to(self._act_dtype()), send_to)] if send is not None and send_to is not None else []
        buf = None
        recvs = []
        if recv_shape is not None and recv_from is not None:
            buf = torch.empty(recv_shape, dtype=self._act_dtype(), device=self.device)
            recvs = [(buf, recv_from)]
        p2p_exchange(sends, recvs, group=self.pipe_group, timeout_s=self.timeout_s)
        return buf

    # ------------------------------------------------------------------ one micro-batch

    def _forward_step(self, mb: GlobalBatch, x_in: Optional[torch.Tensor],
                      loss: LossTerms) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output, loss term): output is the activation for the next stage, or on the
        last stage the loss term itself (ce / n_valid + this stage's aux losses)."""
        with self.autocast():
            x, routings = self.stage_module.run_layers(self.stage_module.embed(mb.inputs) if self.is_first else x_in,
                                                       mask=mb.mask)
            logits = self.stage_module.logits(x) if self.is_last else None
        term = loss(routings, logits, mb)
        return (term if self.is_last else x), term

    def _backward_step(self, x_in: Optional[torch.Tensor], out: torch.Tensor, aux: torch.Tensor,
                       grad_out: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if self.is_last:
            out.backward()  # the loss term already holds this stage's aux losses
        else:
            torch.autograd.backward([out, aux], [grad_out.to(out.dtype), torch.ones_like(aux)])
        return None if x_in is None else x_in.grad

    # ------------------------------------------------------------------ training step

    def run_schedule(self, mine: list[GlobalBatch], loss: LossTerms) -> None:
        M = len(mine)
        warmup = min(self.n_stages - self.stage - 1, M)
        steady = M - warmup
        shape = self._act_shape(mine[0])
        compute = 0.0
        p2p_before = comm_timer().totals()["p2p"]
        sync(self.device)
        t_start = time.perf_counter()
        in_flight: list[tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]] = []
        max_in_flight = 0

        def recv_input(shape_) -> Optional[torch.Tensor]:
            if self.is_first:
                return None
            return self._exchange(None, None, shape_, self.prev_rank).requires_grad_()

        def forward(i: int, x_in) -> torch.Tensor:
            nonlocal compute, max_in_flight
            t = time.perf_counter()
            out, aux = self._forward_step(mine[i], x_in, loss)
            sync(self.device)
            compute += time.perf_counter() - t
            in_flight.append((x_in, out, aux))
            max_in_flight = max(max_in_flight, len(in_flight))
            return out

        def backward(grad_out) -> Optional[torch.Tensor]:
            nonlocal compute
            x_in, out, aux = in_flight.pop(0)
            t = time.perf_counter()
            grad_in = self._backward_step(x_in, out, aux, grad_out)
            sync(self.device)
            compute += time.perf_counter() - t
            return grad_in

        out_shape = None if self.is_last else shape
        for i in range(warmup):
            out = forward(i, recv_input(shape))
            self._exchange(out, self.next_rank, None, None)  # send forward
        x_in = recv_input(shape) if steady > 0 else None
        for j in range(steady):
            i = warmup + j
            out = forward(i, x_in)
            # send forward, receive backward (the gradient of the oldest micro-batch in flight)
            grad_out = self._exchange(None if self.is_last else out, self.next_rank, out_shape, self.next_rank)
            grad_in = backward(grad_out)
            if j == steady - 1:
                self._exchange(grad_in, self.prev_rank, None, None)  # send backward
            else:
                # send backward, receive the next micro-batch's input
                x_in = self._exchange(grad_in, self.prev_rank, None if self.is_first else shape, self.prev_rank)
                if x_in is not None:
                    x_in.requires_grad_()
        for _ in range(warmup):
            grad_out = self._exchange(None, None, out_shape, self.next_rank)  # receive backward
            grad_in = backward(grad_out)
            self._exchange(grad_in, self.prev_rank, None, None)  # send backward
        wall = time.perf_counter() - t_start
        pp = self.n_stages
        self.last_schedule = ScheduleTiming(wall_s=wall, compute_s=compute,
                                            p2p_s=comm_timer().totals()["p2p"] - p2p_before,
                                            ideal_bubble=(pp - 1) / (M + pp - 1),
                                            max_in_flight=max_in_flight)

    def reduce_gradients(self) -> None:
        try:
            sync_gradients([p for _, p in self.named_parameters()], self.dp_group)
            if self.tie_group is not None:
                tied = self.stage_module.embed.weight if self.is_first else self.stage_module.head.weight
                sync_gradients([tied], self.tie_group)
        except RuntimeError as e:
            raise RuntimeError(f"rank {self.rank} (stage {self.stage}, replica {self.replica}): gradient sum "
                               f"over the data-parallel group failed (a peer is gone or silent past "
                               f"{self.timeout_s}s): {str(e).splitlines()[0]}") from e

    def forward_only(self, mbs: list[GlobalBatch], loss: LossTerms) -> None:
        """Micro-batch by micro-batch through the replica's stages."""
        for mb in mbs:
            self._through(mb.inputs, lambda x: self.stage_module.run_layers(x, mask=mb.mask)[0], loss, mb)

    # ------------------------------------------------------------------ decoding

    def _through(self, ids: torch.Tensor, layers: Callable, loss: Optional[LossTerms] = None,
                 mb: Optional[GlobalBatch] = None) -> Optional[torch.Tensor]:
        """One pass of `ids` [B, T] through the replica's pipeline, `layers` on this stage. With
        `loss` (evaluation) the last stage counts the cross-entropy; without, every stage returns
        the next tokens [B], which the last stage picks and broadcasts over the pipeline."""
        B, T = ids.shape
        with self.autocast():
            x = layers(self.stage_module.embed(ids) if self.is_first else
                       self._exchange(None, None, (B, T, self.cfg.model.hidden), self.prev_rank))
            if not self.is_last:
                self._exchange(x, self.next_rank, None, None)
                next_ids = torch.empty(B, dtype=torch.long, device=self.device)
            elif loss is not None:
                loss((), self.stage_module.logits(x), mb)
            else:
                next_ids = self.stage_module.logits(x[:, -1:])[:, -1].argmax(-1)
        if loss is not None:
            return None
        if self.n_stages > 1:
            with comm_timer().time("p2p"):
                dist.broadcast(next_ids, src=self.last_rank, group=self.pipe_group)
        return next_ids

    def new_caches(self, batch, max_len):
        return self.stage_module.new_caches(batch, max_len, self.compute_dtype(), self.device)

    def prefill(self, ids, caches):
        return self._through(ids, lambda x: self.stage_module.run_layers(x, 0, caches)[0])

    def decode_step(self, ids, pos, caches):
        return self._through(ids, lambda x: self.stage_module.decode_layers(x, pos, caches))
