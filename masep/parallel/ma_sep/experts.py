"""The MoE side of MA Separation: a rank holding experts [j*E/M, (j+1)*E/M) of every layer (until
the balancer moves them) that serves the attention ranks' rows (protocol.py says what arrives
when). With `ma.rebalance` it times its expert work per layer and runs the MoE group's sync
points (`masep.parallel.balance.MoEBalancer`)."""
from __future__ import annotations

import io
from contextlib import nullcontext

import torch
from torch import nn

from masep.model import Experts, MoETransformer
from masep.parallel.balance import LayerClock, MoEBalancer
from masep.parallel.ma_sep.head import serve_head_backward, serve_head_forward
from masep.parallel.ma_sep.protocol import MASepRank, serve_backward, serve_decode_step, serve_forward, waves
from masep.parallel.sharding import tp_shard

_EXPERT_PARAMS = ("moe.experts.w_up", "moe.experts.w_down")


class ExpertServer(MASepRank):
    def __init__(self, cfg, layout, rank, device, model: MoETransformer):
        super().__init__(cfg, layout, rank, device)
        mc = cfg.model
        self.moe_index = layout.coords(rank)["moe_index"]
        self.experts = nn.ModuleList()
        for block in model.blocks:
            with torch.device(self.device):
                ex = Experts(self.n_local, mc.hidden, mc.expert_hidden, mc.expert_activation, mc.expert_dropout)
            ex.load_state_dict({k: tp_shard("moe.experts." + k, v, mc, self.moe_index, self.M)
                                for k, v in block.moe.experts.state_dict().items()})
            self.experts.append(ex)
        self.experts.to(self.device)
        if self.head_split is not None:  # the whole matrix, zero but for the rows this rank computes
            self.head = nn.Parameter(model.head.weight.detach().to(self.device, copy=True))
            self.head_split.keep_owned(self.head)
        self.balancer = None
        if cfg.ma.rebalance:
            self.balancer = MoEBalancer(cfg.ma, self.E, self.L, self.moe_group, self.moe_ranks, run_id="",
                                        timeout_s=self.timeout_s, seed=cfg.train.seed)
            self.clock = LayerClock(self.L, self.device)

    def _build_groups(self) -> None:
        super()._build_groups()
        if getattr(self, "balancer", None) is not None:  # a regroup: the balancer talks over the new group
            self.balancer.group = self.moe_group

    def modules(self):
        return [self.experts]

    def named_parameters(self):
        return [(f"blocks.{layer}.moe.experts.{n}", p)
                for layer, ex in enumerate(self.experts) for n, p in ex.named_parameters()] \
            + ([("head.weight", self.head)] if self.head_split is not None else [])

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
                    served[layer, i] = serve_forward(self, self.experts[layer], senders,
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
            serve_decode_step(self, self.experts, senders, f"token {i + 1}")
        return [0.0] * n  # no clock of its own: it reports rank 0's times
