"""The MoE side of MA Separation: a rank holding experts [j*E/M, (j+1)*E/M) of every layer that
serves the attention ranks' rows (protocol.py says what arrives when)."""
from __future__ import annotations

import torch
from torch import nn

from masep.model import Experts, MoETransformer
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

    def modules(self):
        return [self.experts]

    def named_parameters(self):
        return [(f"blocks.{layer}.moe.experts.{n}", p)
                for layer, ex in enumerate(self.experts) for n, p in ex.named_parameters()]

    def checkpoint_key(self, name: str) -> str:
        return f"{name}.moe{self.moe_index}of{self.M}"

    def adds_stats(self) -> bool:
        return False

    def run_schedule(self, mbs, loss) -> None:
        self._serve(len(mbs), self.attn_ranks)  # one replica's count: every replica sends each

    def _serve(self, n_micro: int, senders: list[int]) -> None:
        """Serve `n_micro` micro-batches of `senders`, wave by wave (forward only without grad)."""
        pending = []
        for wave in waves(n_micro, self.in_flight):
            served = {}
            for layer in range(self.L):
                for i in wave:
                    served[layer, i] = serve_forward(self, self.experts[layer], senders,
                                                     f"layer {layer} micro-batch {i}")
            if not torch.is_grad_enabled():
                pending += [s.sent for s in served.values()]
                continue
            for layer in reversed(range(self.L)):
                for i in wave:
                    pending.append(serve_backward(self, served.pop((layer, i)), f"layer {layer} micro-batch {i}"))
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
