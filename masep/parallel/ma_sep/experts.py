"""The MoE side of MA Separation: a rank holding experts [j*E/M, (j+1)*E/M) of every layer (until
the balancer moves them) that serves the attention ranks' rows (protocol.py says what arrives
when). With `ma.rebalance` it times its expert work per layer and runs the MoE group's sync
points (`masep.parallel.balance.MoEBalancer`).

Copies (`ma.failover`, 2+ MoE ranks, no `ma.rebalance`): after every optimizer step each MoE
rank sends the next live MoE rank (in a ring) its experts' weights and AdamW state, kind `p2p`;
before the first step the copy is the seed's initial weights, which every rank builds. When a
MoE rank is lost, the next one takes its expert shards over from that copy (`take_over`) and the
survivors redo the step in flight: the copy is the state after the last completed step, so the
run computes what an uninterrupted one does (with `model.expert_dropout` > 0 the taken-over
experts draw their dropout from the taker's stream). The cost: 3x the experts' parameters sent
per step and held on the receiver."""
from __future__ import annotations

import io
from contextlib import nullcontext
from functools import partial
from typing import Optional

import torch
from torch import nn

from masep.model import Experts, MoETransformer
from masep.parallel.balance import LayerClock, MoEBalancer
from masep.parallel.ma_sep.head import serve_head_backward, serve_head_forward
from masep.parallel.comm import post_p2p
from masep.parallel.ma_sep.protocol import MASepRank, serve_backward, serve_decode_step, serve_forward, waves
from masep.parallel.sharding import tp_shard

TAG_COPY = 4


def run_held(blocks: list[Experts], x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows sorted by slot over blocks of experts held one after another (`counts` per slot)."""
    if len(blocks) == 1:
        return blocks[0](x_sorted, counts)
    per_block = counts.split([b.n_experts for b in blocks])
    xs = x_sorted.split([int(c.sum()) for c in per_block])
    return torch.cat([b(x, c) for b, x, c in zip(blocks, xs, per_block)])


class ExpertServer(MASepRank):
    def __init__(self, cfg, layout, rank, device, model: MoETransformer):
        super().__init__(cfg, layout, rank, device)
        self.moe_index = layout.coords(rank)["moe_index"]
        self.experts = self._shard(model, self.moe_index)
        self.shards = {self.moe_index: self.experts}  # expert shard -> its experts of every layer
        self.copy: Optional[dict] = None  # the previous MoE rank's shards, as of `steps` optimizer steps
        if self.copies:
            j = (self.moe_index - 1) % self.M
            self.copy = {"steps": 0, "shards": [j], "adam_step": None,
                         "data": self._pack([(w, None) for w in self._shard(model, j).parameters()], 0, None)}
        if self.head_split is not None:  # the whole matrix, zero but for the rows this rank computes
            self.head = nn.Parameter(model.head.weight.detach().to(self.device, copy=True))
            self.head_split.keep_owned(self.head)
        self.balancer = None
        if cfg.ma.rebalance:
            self.balancer = MoEBalancer(cfg.ma, self.E, self.L, self.moe_group, self.moe_ranks, run_id="",
                                        timeout_s=self.timeout_s, seed=cfg.train.seed)
            self.clock = LayerClock(self.L, self.device)

    def _empty_experts(self) -> Experts:
        """One layer's block of E/M experts, uninitialised, on this rank's device."""
        mc = self.cfg.model
        with torch.device(self.device):
            return Experts(self.n_local, mc.hidden, mc.expert_hidden, mc.expert_activation, mc.expert_dropout)

    def _shard(self, model: MoETransformer, j: int) -> nn.ModuleList:
        """Expert shard j (experts [j*E/M, (j+1)*E/M)) of every layer of `model`."""
        out = nn.ModuleList()
        for block in model.blocks:
            ex = self._empty_experts()
            ex.load_state_dict({k: tp_shard("moe.experts." + k, v, self.cfg.model, j, self.M)
                                for k, v in block.moe.experts.state_dict().items()})
            out.append(ex)
        return out

    def _held(self) -> list[int]:
        return self.holdings[self.moe_ranks.index(self.rank)]

    def _blocks(self, layer: int) -> list[Experts]:
        return [self.shards[j][layer] for j in self._held()]

    def forward_block(self, layer: int, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """A decode step's outputs of my slots' rows (fixed shapes: zeros elsewhere)."""
        first, out = self.first_slot(self.moe_ranks.index(self.rank)), 0
        for b in self._blocks(layer):
            out = out + b.forward_block(x, counts, first)
            first += b.n_experts
        return out

    # ---- ma.failover: copies of the previous MoE rank's experts, and taking them over

    def _pack(self, params_and_state, steps: int, adam_step) -> torch.Tensor:
        """One flat fp32 tensor: [steps, has AdamW state, its step count], then each parameter
        with its exp_avg and exp_avg_sq (zeros before the first step)."""
        head = torch.tensor([steps, adam_step is not None, adam_step or 0], dtype=torch.float32, device=self.device)
        parts = [head]
        for w, st in params_and_state:
            parts += [w.detach().float().reshape(-1)] + [
                (st[k] if st else torch.zeros_like(w)).detach().float().reshape(-1) for k in ("exp_avg", "exp_avg_sq")]
        return torch.cat(parts)

    def _copy_size(self, shards: list[int]) -> int:
        per_shard = sum(3 * p.numel() for p in self.experts.parameters())
        return 3 + per_shard * len(shards)

    def after_step(self, step, opt) -> None:
        super().after_step(step, opt)
        if not self.copies or len(self.moe_ranks) < 2:  # a lone MoE rank: no other rank to keep its copy
            return
        pos, M = self.moe_ranks.index(self.rank), len(self.moe_ranks)
        prev_shards = self.holdings[(pos - 1) % M]
        params = [p for j in self._held() for p in self.shards[j].parameters()]
        adam = opt.state.get(params[0], {}).get("step")
        mine = self._pack([(p, opt.state.get(p)) for p in params], step + 1, None if adam is None else float(adam))
        theirs = torch.empty(self._copy_size(prev_shards), dtype=torch.float32, device=self.device)
        post_p2p([(mine, self.moe_ranks[(pos + 1) % M])], [(theirs, self.moe_ranks[(pos - 1) % M])],
                 self.moe_group, "p2p", TAG_COPY, f"exchanging expert copies after step {step}", self.timeout_s).wait()
        steps, has_state, adam_step = theirs[:3].tolist()
        self.copy = {"steps": int(steps), "shards": prev_shards,
                     "adam_step": adam_step if has_state else None, "data": theirs}

    def take_over(self, shards: list[int], steps_done: int, opt) -> bool:
        if not shards:
            return True
        c = self.copy
        if c is None or c["shards"] != shards or c["steps"] != steps_done:
            return False
        flat, at = c["data"], 3
        like = next(iter(opt.state.values()), {}).get("step") if opt.state else None
        decay = opt.param_groups[0]  # make_optimizer: matrices (every expert weight) decay
        for j in shards:
            block = nn.ModuleList()
            for _ in range(self.L):
                ex = self._empty_experts()
                for p in ex.parameters():
                    n = p.numel()
                    w, m, v = (flat[at + i * n:at + (i + 1) * n].view_as(p) for i in range(3))
                    at += 3 * n
                    p.data.copy_(w)
                    decay["params"].append(p)
                    if c["adam_step"] is not None:
                        step = torch.full_like(like, c["adam_step"]) if like is not None else torch.tensor(c["adam_step"])
                        opt.state[p] = {"step": step, "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
                block.append(ex)
            self.shards[j] = block.train(self.experts.training)
        self.copy = None
        return True

    def _build_groups(self) -> None:
        super()._build_groups()
        if getattr(self, "balancer", None) is not None:  # a regroup: the balancer talks over the new group
            self.balancer.group = self.moe_group

    def modules(self):
        return list(self.shards.values())

    def _named(self) -> list[tuple[str, int, nn.Parameter]]:
        return [(f"blocks.{layer}.moe.experts.{n}", j, p)
                for j in self._held() for layer, ex in enumerate(self.shards[j]) for n, p in ex.named_parameters()]

    def named_parameters(self):
        return [(n, p) for n, _, p in self._named()] \
            + ([("head.weight", self.head)] if self.head_split is not None else [])

    def checkpoint_params(self):
        return [(f"{n}.moe{j}of{self.M}", p) for n, j, p in self._named()] \
            + ([(self.checkpoint_key("head.weight"), self.head)] if self.head_split is not None else [])

    def head_weight(self):
        return self.head

    def checkpoint_key(self, name: str) -> str:
        return f"{name}.moe{self.moe_index}of{self.M}"

    def adds_stats(self) -> bool:
        return False

    def run_schedule(self, mbs, loss) -> None:
        # One replica's count: every replica sends each. The head's rows come from head shard 0.
        self._serve(len(mbs), self.attn_ranks, mbs[0].inputs.numel() if self.head_split is not None else 0)

    def forward_backward(self, batch):
        stats = super().forward_backward(batch)
        if self.balancer is not None:
            # A layer whose experts got no rows in a whole step took (practically) no time.
            self.balancer.record(stats.tokens_per_expert, [max(s, 1e-6) for s in self.clock.read()])
        return stats

    def _timed(self, layer: int, forward: bool):
        """The clock around one (layer, micro-batch) of expert work while training with balancing,
        with the test-only delay of the experts held here in the forward."""
        if self.balancer is None or not torch.is_grad_enabled():
            return nullcontext()
        delays = self.cfg.ma.debug_expert_delay_s
        delay = sum(delays.get(e, 0.0) for e, (j, _) in self.balancer.rows.items() if j == self.moe_index)
        return self.clock.time(layer, delay if forward else 0.0)

    def rebalance(self, step, opt) -> None:
        self.balancer.sync(step, [[ex.w_up, ex.w_down] for ex in self.experts], opt)
        self._follow_rows()

    def _follow_rows(self) -> None:
        for e, (j, row) in self.balancer.rows.items():
            self.slot_of[e] = j * self.n_local + row

    def extra_state(self) -> dict:
        state = super().extra_state()
        if self.balancer is not None:
            buf = io.BytesIO()
            torch.save(self.balancer.state_dict(), buf)
            state[f"ma_sep.balancer.rank{self.rank}"] = buf.getvalue()
        return state

    def load_extra_state(self, state) -> None:
        super().load_extra_state(state)
        if self.balancer is not None and f"ma_sep.balancer.rank{self.rank}" in state:
            self.balancer.load_state_dict(torch.load(io.BytesIO(state[f"ma_sep.balancer.rank{self.rank}"]),
                                                     weights_only=False))
            self._follow_rows()

    def events(self) -> list:
        return (self.balancer.events if self.balancer is not None else []) + super().events()

    def _serve(self, n_micro: int, senders: list[int], head_tokens: int = 0) -> None:
        """Serve `n_micro` micro-batches of `senders`, wave by wave (forward only without grad),
        and the head's rows of `head_tokens` tokens per micro-batch where given."""
        pending = []
        head_senders = senders[::self.tp]
        for wave in waves(n_micro, self.in_flight):
            served = {}
            for layer in range(self.L):
                for i in wave:
                    served[layer, i] = serve_forward(self, partial(run_held, self._blocks(layer)), senders,
                                                     f"layer {layer} micro-batch {i}", self._timed(layer, True))
            heads = {i: serve_head_forward(self, self.head, head_senders, head_tokens, f"micro-batch {i}")
                     for i in wave} if head_tokens else {}
            if not torch.is_grad_enabled():
                pending += [s.sent for s in served.values()] + [h.sent for h in heads.values() if h is not None]
                continue
            for i, h in heads.items():
                pending.append(serve_head_backward(self, h, head_senders, head_tokens, f"micro-batch {i}"))
            for layer in reversed(range(self.L)):
                for i in wave:
                    pending.append(serve_backward(self, served.pop((layer, i)), f"layer {layer} micro-batch {i}",
                                                  self._timed(layer, False)))
        for p in pending:
            if p is not None:
                p.wait()

    def decode_rows(self, batch: int) -> slice:
        return slice(0, 0)  # it serves the attention ranks' rows

    def serve_prefill(self, batch: int) -> None:
        self._serve(1, self.attn_ranks[: self.decoding_replicas(batch) * self.tp])

    def serve_decode(self, n: int, batch: int) -> list[float]:
        active = self.decoding_replicas(batch)
        rows = batch // active * self.cfg.model.top_k
        senders = [(r * self.tp, rows) for r in range(active)]  # head shard 0 of each decoding replica
        for i in range(n):  # no wait between steps: the next step's receives are posted early
            serve_decode_step(self, senders, f"token {i + 1}")
        return [0.0] * n  # no clock of its own: it reports rank 0's times
