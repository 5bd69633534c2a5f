"""What travels between attention ranks and MoE ranks, and when (the schedule both derive from
the batch shape and the layout alone).

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

Schedule (deterministic)
Let L = layers, n = layout.microbatches (per replica), m = parallel.in_flight (at most n). A
replica's micro-batches run in waves of m. Segment s of a micro-batch is:
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

Decode steps have fixed shapes: head shard 0 of each decoding replica sends every MoE rank all
top-k rows of its tokens with the counts per expert; each MoE rank answers with its experts'
block (zeros elsewhere), and the sum of the answers is every row's output.
"""
from __future__ import annotations

from abc import abstractmethod

import pickle
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from masep.config import keeps_expert_copies
from masep.parallel.balance import HeadSplit, write_events
from masep.parallel.base import Generation, Strategy, sync
from masep.parallel.comm import PendingP2P, new_group_containing, post_p2p
from masep.telemetry.timing import comm_timer

KIND = "moe_dispatch"
# Tags keep the three kinds of message apart on gloo (NCCL ignores tags and relies on order).
TAG_COUNTS, TAG_ROWS, TAG_GRADS = 1, 2, 3


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

    def blocks(self) -> list[tuple[int, int, int]]:
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
    mb: Optional[object] = None  # the GlobalBatch micro-batch (targets and mask) when a loss is computed
    index: int = 0  # micro-batch index inside the replica's step (for error messages)
    valid: Optional[torch.Tensor] = None  # the positions to route (None: all)
    routes: dict = field(default_factory=dict)  # layer -> _Route
    outputs: dict = field(default_factory=dict)  # segment -> (tensors, their gradients' sources)
    logits: Optional[torch.Tensor] = None
    head: Optional[object] = None  # head.HeadFlight where the head is split


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


class Unrecoverable(RuntimeError):
    """A lost rank that in-job recovery cannot replace (the run then fails as without failover)."""


def waves(n: int, in_flight: int) -> list[range]:
    m = max(1, min(in_flight, n))
    return [range(i, min(i + m, n)) for i in range(0, n, m)]


def split(t: torch.Tensor, blocks) -> list[tuple[torch.Tensor, int]]:
    """(rows of `t`, peer) for each (peer, first row, rows) block."""
    return [(t[a:a + n], peer) for peer, a, n in blocks]


class MASepRank(Strategy):
    """What both roles share: the layout's numbers, the process groups, the wire."""

    name = "ma_sep"

    def __init__(self, cfg, layout, rank, device):
        super().__init__(cfg, layout, rank, device)
        mc = cfg.model
        self.L, self.E = mc.layers, mc.experts
        self.tp, self.R, self.M = layout.attn_tp, layout.attn_replicas, layout.moe_ranks
        self.replicas, self.n_local = self.R, self.E // self.M
        self.attn_ranks, self.moe_ranks = layout.attention_ranks, layout.moe_rank_list
        self.wire_dtype = self.compute_dtype()  # rows travel in the dtype the experts compute in
        self.timeout_s = cfg.parallel.timeout_s
        self.in_flight = cfg.parallel.in_flight
        self.live = list(range(self.R))  # the attention replicas still running (ma.failover)
        # The expert shards (of E/M experts each, by original MoE index) each live MoE rank holds:
        # its own, and under ma.failover those it took over from a lost MoE rank (`regroup`).
        self.holdings = [[j] for j in range(self.M)]
        self.copies = keeps_expert_copies(cfg)  # each MoE rank keeps the previous one's experts (ExpertServer)
        self._build_groups()
        if self.device.type == "cuda":
            # NCCL: batched P2P must not be a group's first operation unless all ranks join it.
            for g in (self.to_moe, self.to_attn):
                dist.all_reduce(torch.zeros(1, device=self.device), group=g)
        # Expert e is row slot_of[e] - first_slot(j) of the j-th live MoE rank when it lies in
        # that rank's block (balance.py's rows; after a take-over the blocks are no longer equal);
        # routing sorts rows by slot, so each MoE rank's rows stay one contiguous block.
        self.slot_of = torch.arange(self.E, device=self.device)
        self.head_split = HeadSplit(cfg.ma, mc.vocab_size, layout, self.device, cfg.train.seed) \
            if cfg.ma.head_split else None

    def rows_of(self, j: int) -> int:
        """Expert rows (slots) the j-th live MoE rank holds."""
        return self.n_local * len(self.holdings[j])

    def first_slot(self, j: int) -> int:
        return sum(self.rows_of(k) for k in range(j))

    @abstractmethod
    def head_weight(self) -> torch.nn.Parameter:
        """The output head's weight as this rank holds it (with `ma.head_split`)."""

    def forward_backward(self, batch):
        if self.head_split is None:
            return super().forward_backward(batch)
        comm0, t0 = sum(comm_timer().totals().values()), time.perf_counter()
        stats = super().forward_backward(batch)
        sync(self.device)
        self.head_split.record(time.perf_counter() - t0 - (sum(comm_timer().totals().values()) - comm0))
        return stats

    def after_step(self, step, opt) -> None:
        """At a sync point the head's cut moves between the groups, the MoE ranks rebalance their
        experts and every rank learns the new slots."""
        if not self.cfg.ma.rebalance or (step + 1) % self.cfg.ma.rebalance_every:
            return
        if self.head_split is not None and self.head_split.window:
            self.head_split.sync(step, self.head_weight(), opt)
        self.rebalance(step, opt)
        dist.broadcast(self.slot_of, src=self.moe_ranks[0], group=self.to_moe)

    def rebalance(self, step, opt) -> None:
        """The MoE side's sync point (nothing on the attention side)."""

    def events(self) -> list:
        """This rank's balancing events."""
        return list(self.head_split.events) if self.head_split is not None else []

    def write_rows(self, run_dir, run_id: str) -> None:
        events = self.events()
        for e in events:
            e.run_id = run_id
        write_events(run_dir, run_id, events)

    def extra_state(self) -> dict:
        # Always saved: a checkpoint's expert rows and head rows follow them, balancing on or not when loaded.
        cut = self.head_split.cut if self.head_split is not None else self.cfg.model.vocab_size
        # Slots as the layout numbers them (shard j's rows from j * n_local), which a resumed run
        # starts from, also after a take-over reordered the blocks.
        order = torch.tensor([j for held in self.holdings for j in held], device=self.device)
        layout_slots = order[self.slot_of // self.n_local] * self.n_local + self.slot_of % self.n_local
        state = {"ma_sep.slot_of": layout_slots, "ma_sep.head_cut": torch.tensor([cut], device=self.device)}
        if self.head_split is not None:
            state[f"ma_sep.head_split.rank{self.rank}"] = pickle.dumps(self.head_split.state_dict())
        return state

    def load_extra_state(self, state) -> None:
        if "ma_sep.slot_of" in state:
            self.slot_of.copy_(state["ma_sep.slot_of"])  # loaded at the start: each MoE rank holds its own shard
        cut = int(state.get("ma_sep.head_cut", [self.cfg.model.vocab_size])[0])
        if self.head_split is None and cut != self.cfg.model.vocab_size:
            raise ValueError(f"rank {self.rank}: the checkpoint splits the output head between the groups "
                             "(written with ma.head_split=true): resume it with ma.head_split=true")
        if self.head_split is not None and f"ma_sep.head_split.rank{self.rank}" in state:
            self.head_split.load_state_dict(pickle.loads(state[f"ma_sep.head_split.rank{self.rank}"]))

    def _build_groups(self) -> None:
        """The groups among the live replicas' attention ranks and the MoE ranks. Every member
        creates every group, in the same order (torch.distributed requires it)."""
        timeout = timedelta(seconds=self.timeout_s)
        tp, rank = self.tp, self.rank
        self.replica_group = new_group_containing(
            rank, [[r * tp + t for t in range(tp)] for r in self.live], timeout)
        self.shard_group = new_group_containing(
            rank, [[r * tp + t for r in self.live] for t in range(tp)], timeout)
        everyone = [r * tp + t for r in self.live for t in range(tp)] + self.moe_ranks
        self.to_moe = dist.new_group(everyone, timeout=timeout)  # attention -> MoE transfers
        self.to_attn = dist.new_group(everyone, timeout=timeout)  # MoE -> attention transfers
        self.moe_group = new_group_containing(rank, [self.moe_ranks], timeout) \
            if self.cfg.ma.rebalance or self.copies else None
        if len(everyone) < self.layout.world_size:  # after a regroup: the default group is broken
            self.world_group = dist.new_group(everyone, timeout=timeout)

    def drop_groups(self) -> None:
        """Destroy this rank's groups after a communication error (nothing is called on them).
        gloo keeps the connections open: peers blocked on this rank learn of the regroup from
        the store instead (`Membership.begun`)."""
        groups = (self.replica_group, self.shard_group, self.to_moe, self.to_attn, self.moe_group, self.world_group)
        for g in set(groups) - {None}:
            dist.destroy_process_group(g)
        self.replica_group = self.shard_group = self.to_moe = self.to_attn = self.moe_group = self.world_group = None

    def regroup(self, members: list[int], steps_done: int, completed: bool, opt) -> str:
        """Continue with the ranks `members` (the survivors of a lost rank; each completed
        `steps_done` optimizer steps, the last one `completed` in the step that saw the loss): a
        replica that lost any rank is dropped, the live replicas take its share of every later
        global batch; a lost MoE rank's experts are taken over by the MoE rank holding their copy
        (`ExpertServer.take_over`). Returns what was done; raises `Unrecoverable` where in-job
        recovery cannot help (on every survivor alike)."""
        lost = sorted(set(self.attn_ranks + self.moe_ranks) - set(members))
        lost_moe = [r for r in lost if r in self.moe_ranks]
        if completed and self.cfg.ma.rebalance and steps_done % self.cfg.ma.rebalance_every == 0:
            raise Unrecoverable(f"rank {self.rank}: rank(s) {lost} lost at step {steps_done - 1}'s balancing sync "
                                f"point, which may be half done; restart from the last checkpoint")
        if lost_moe and not self.copies:
            raise Unrecoverable(f"rank {self.rank}: MoE rank(s) {lost_moe} lost and no copy of their experts is kept "
                                f"({'a single MoE rank' if self.M == 1 else 'ma.rebalance is on'}); "
                                f"restart from the last checkpoint")
        live = [r for r in self.live if all(r * self.tp + t in members for t in range(self.tp))]
        n = self.layout.microbatches * self.layout.attn_replicas
        if not live or n % len(live):
            raise Unrecoverable(f"rank {self.rank}: after losing rank(s) {lost}, the {n} micro-batches of a "
                                f"global batch cannot be split over the live attention replicas {live}")
        if self.rank in self.attn_ranks and self.replica not in live:
            raise Unrecoverable(f"rank {self.rank}: its attention replica {self.replica} lost rank(s) {lost}: "
                                f"this rank leaves, the other replicas take the replica's share")
        done = []
        if len(live) < len(self.live):
            done.append(f"attention replica(s) {sorted(set(self.live) - set(live))} dropped; replicas {live} "
                        f"take {n // len(live)} micro-batches each")
        takers = self._take_over_plan(lost_moe)
        self.live, self.R = live, len(live)
        self.replicas = self.R
        self.attn_ranks = [r * self.tp + t for r in live for t in range(self.tp)]
        self._build_groups()
        if takers:
            ok = torch.tensor([int(self.take_over(takers.get(self.rank, []), steps_done, opt))])
            dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.world_group)
            if not ok.item():
                raise Unrecoverable(f"rank {self.rank}: MoE rank(s) {lost_moe} lost before their experts' copy of "
                                    f"step {steps_done} reached its holder; restart from the last checkpoint")
            done += [f"MoE rank {t} took over expert shard(s) {js} from its copy" for t, js in takers.items()]
        return "; ".join(done)

    def _take_over_plan(self, lost_moe: list[int]) -> dict[int, list[int]]:
        """Each lost MoE rank's experts go to the next live MoE rank, which holds their copy: the
        new MoE rank list, holdings and slots (the same on every survivor); {taker: shards}."""
        if not lost_moe:
            return {}
        M, pos = len(self.moe_ranks), [self.moe_ranks.index(r) for r in lost_moe]
        takers: dict[int, list[int]] = {}
        for k in pos:
            t = (k + 1) % M
            if t in pos:
                raise Unrecoverable(f"rank {self.rank}: MoE rank {self.moe_ranks[k]} and rank {self.moe_ranks[t]}, "
                                    f"which holds its experts' copy, are both lost; restart from the last checkpoint")
            takers.setdefault(t, []).append(k)
        blocks = {k: (self.first_slot(k), self.rows_of(k)) for k in range(M)}
        keep = [k for k in range(M) if k not in pos]
        new_slot, order = torch.empty_like(self.slot_of), [k2 for k in keep for k2 in [k] + takers.get(k, [])]
        start = 0
        for k in order:  # survivors in order, each followed by the blocks it takes over
            first, rows = blocks[k]
            in_block = (self.slot_of >= first) & (self.slot_of < first + rows)
            new_slot[in_block] = self.slot_of[in_block] - first + start
            start += rows
        self.slot_of.copy_(new_slot)
        taken = {self.moe_ranks[t]: [j for k in ks for j in self.holdings[k]] for t, ks in takers.items()}
        self.holdings = [self.holdings[k] + [j for lk in takers.get(k, []) for j in self.holdings[lk]] for k in keep]
        self.moe_ranks = [self.moe_ranks[k] for k in keep]
        return taken

    def take_over(self, shards: list[int], steps_done: int, opt) -> bool:
        """Hold expert shards `shards` from now on (MoE ranks: from the copy); whether the copy
        held was current (`steps_done` optimizer steps). Attention ranks hold none."""
        return True

    def my_microbatches(self, mbs, exact=True):
        if len(self.live) == self.layout.attn_replicas:
            return super().my_microbatches(mbs, True)  # the MoE ranks serve the layout's count
        n, share = len(mbs), self.live.index(self.replica) if self.replica in self.live else 0
        return mbs[share * n // self.R:(share + 1) * n // self.R]

    def post(self, sends, recvs, to_moe: bool, tag: int, what: str) -> PendingP2P:
        """Post transfers on the attention -> MoE group (`to_moe`) or the way back."""
        return post_p2p(sends, recvs, self.to_moe if to_moe else self.to_attn, KIND, tag, what, self.timeout_s)

    def decoding_replicas(self, batch: int) -> int:
        """Replicas that decode: all when they can split the batch evenly and routing is per
        token (dropless); else replica 0 alone, so that the whole batch competes for each
        expert's capacity as on one rank (as ep_dp decodes)."""
        return self.R if batch % self.R == 0 and self.cfg.model.capacity_factor is None else 1

    def generate(self, prompt: torch.Tensor, new_tokens: int, on_token=None) -> Generation:
        with self.head_split.whole(self.head_weight()) if self.head_split is not None else nullcontext():
            gen = super().generate(prompt, new_tokens, on_token)
        # Every rank reports the times where the tokens reach a client: at rank 0, head shard 0
        # of replica 0.
        seen = torch.tensor([gen.prefill_s] + gen.token_s, dtype=torch.float64, device=self.device)
        dist.broadcast(seen, src=0)
        return Generation(gen.tokens, float(seen[0]), seen[1:].tolist())


# ------------------------------------------------------------------ the attention side of the wire


def dispatch(rank: MASepRank, route: _Route, rows: torch.Tensor, where: str) -> None:
    """Post the counts and rows of my share to the MoE ranks, and the receive of their outputs."""
    counts = [(torch.tensor(c, dtype=torch.long), dst) for dst, _, c in route.to_moe]
    data = rows.detach()
    route.sent.append(rank.post(counts, [], True, TAG_COUNTS, f"sending counts of {where}"))
    route.sent.append(rank.post(split(data, route.blocks()), [], True, TAG_ROWS, f"sending rows of {where}"))
    route.y_buf = torch.empty_like(data)
    route.returned = rank.post([], split(route.y_buf, route.blocks()), False, TAG_ROWS,
                               f"receiving expert outputs of {where}")


def send_output_grads(rank: MASepRank, route: _Route, where: str) -> PendingP2P:
    """Send the gradient of `route`'s expert outputs to the MoE ranks; post the receive of the
    gradient of its rows."""
    gy = route.y_leaf.grad if route.y_leaf.grad is not None else torch.zeros_like(route.y_leaf)
    gy = gy.contiguous()
    sent = rank.post(split(gy, route.blocks()), [], True, TAG_GRADS, f"sending output gradients of {where}")
    route.gx_buf = torch.empty_like(gy)
    route.grads_back = rank.post([], split(route.gx_buf, route.blocks()), False, TAG_GRADS,
                                 f"receiving input gradients of {where}")
    route.y_leaf = route.y_buf = None
    return sent


def remote_experts_static(rank: MASepRank, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """A decode step's expert outputs of all rows (sorted by expert, `counts` per expert), fixed
    shapes: every MoE rank gets all rows and answers with its experts' block."""
    x = x_sorted.to(rank.wire_dtype).contiguous()
    outs = [torch.empty_like(x) for _ in rank.moe_ranks]
    sent = [rank.post([(counts.contiguous(), d) for d in rank.moe_ranks], [], True, TAG_COUNTS,
                      "sending counts of a decode step"),
            rank.post([(x, d) for d in rank.moe_ranks], [], True, TAG_ROWS, "sending rows of a decode step")]
    rank.post([], list(zip(outs, rank.moe_ranks)), False, TAG_ROWS, "receiving expert outputs of a decode step").wait()
    for p in sent:
        p.wait()
    return outs[0] if len(outs) == 1 else torch.stack(outs).sum(0)  # one nonzero term per row


# ------------------------------------------------------------------ the MoE side of the wire


def serve_forward(rank: MASepRank, experts, senders: list[int], where: str, timed=nullcontext()) -> _Served:
    """Receive the rows of one (layer, micro-batch) from `senders`, run `experts` on all of them
    at once (inside the context `timed`) and post each sender's outputs back."""
    El = rank.rows_of(rank.moe_ranks.index(rank.rank))
    counts = [torch.empty(El, dtype=torch.long) for _ in senders]
    rank.post([], list(zip(counts, senders)), True, TAG_COUNTS, f"receiving counts of {where}").wait()
    per = torch.stack(counts)  # [senders, local experts]
    served = _Served(list(senders), per.sum(1).tolist())
    x = torch.empty((sum(served.sizes), rank.cfg.model.hidden), dtype=rank.wire_dtype, device=rank.device)
    rank.post([], split(x, served.blocks()), True, TAG_ROWS, f"receiving rows of {where}").wait()
    if x.shape[0] == 0:
        return served
    if torch.is_grad_enabled():
        x.requires_grad_()
    expert_of_row = torch.repeat_interleave(torch.arange(El).repeat(len(senders)), per.reshape(-1))
    order = torch.argsort(expert_of_row, stable=True).to(rank.device)
    with rank.autocast(), timed:
        y_sorted = experts(x[order], per.sum(0).to(rank.device))
    y = y_sorted[torch.argsort(order)].to(rank.wire_dtype)
    served.sent = rank.post(split(y.detach(), served.blocks()), [], False, TAG_ROWS,
                            f"sending expert outputs of {where}")
    served.x, served.y = x, y
    return served


def serve_backward(rank: MASepRank, served: _Served, where: str, timed=nullcontext()) -> Optional[PendingP2P]:
    if served.x is None:
        return None  # no rows: the attention side sends and expects nothing either
    gy = torch.empty_like(served.y, requires_grad=False)
    rank.post([], split(gy, served.blocks()), True, TAG_GRADS, f"receiving output gradients of {where}").wait()
    with timed:
        torch.autograd.backward(served.y, gy)
    served.sent.wait()
    return rank.post(split(served.x.grad, served.blocks()), [], False, TAG_GRADS,
                     f"sending input gradients of {where}")


def serve_decode_step(rank, senders: list[tuple[int, int]], what: str) -> None:
    """One decode step: for every layer, the rows of each (sender, rows) pair (fixed shapes)."""
    for layer in range(rank.L):
        counts = [torch.empty(rank.E, dtype=torch.long, device=rank.device) for _ in senders]
        xs = [torch.empty((m, rank.cfg.model.hidden), dtype=rank.wire_dtype, device=rank.device)
              for _, m in senders]
        where = f"{what} layer {layer}"
        rank.post([], [(c, src) for c, (src, _) in zip(counts, senders)], True, TAG_COUNTS,
                  f"receiving counts of {where}").wait()
        rank.post([], [(x, src) for x, (src, _) in zip(xs, senders)], True, TAG_ROWS,
                  f"receiving rows of {where}").wait()
        with rank.autocast():
            ys = [rank.forward_block(layer, x, c).to(rank.wire_dtype).contiguous()
                  for x, c in zip(xs, counts)]
        rank.post([(y, src) for y, (src, _) in zip(ys, senders)], [], False, TAG_ROWS,
                  f"sending expert outputs of {where}").wait()
