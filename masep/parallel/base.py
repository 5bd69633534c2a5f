"""What a parallel strategy offers the strategy-blind train and decode loops.

Global-batch semantics (identical on one rank and on many):
- The optimizer step sees a global batch of G sequences cut into G / micro_batch micro-batches.
  Every rank receives the whole global batch and takes the micro-batches its role needs
  (a data-parallel replica takes a contiguous block of them).
- The language-model loss is the mean cross-entropy over all valid (mask = 1) target tokens of
  the global batch: each micro-batch contributes ce_sum / n_valid_global.
- The auxiliary losses are computed per micro-batch (the tokens one replica routes in one
  forward), summed over layers, and averaged over the global batch's micro-batches:
  loss += (lb_coef * sum_layers lb + z_coef * sum_layers z) / n_micro_total.
- Gradients of a parameter are summed (not averaged) over the ranks that computed parts of them.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from masep.config import Config
from masep.model import Routing, drop_weight_copy
from masep.parallel.layout import Layout


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class GlobalBatch:
    inputs: torch.Tensor  # [G, T] long
    targets: torch.Tensor  # [G, T] long
    mask: torch.Tensor  # [G, T] float, 1 where the target counts

    def to(self, device) -> "GlobalBatch":
        return GlobalBatch(self.inputs.to(device), self.targets.to(device), self.mask.to(device))

    def microbatches(self, size: int) -> list["GlobalBatch"]:
        return [GlobalBatch(self.inputs[i:i + size], self.targets[i:i + size], self.mask[i:i + size])
                for i in range(0, self.inputs.shape[0], size)]

    def n_valid(self) -> int:
        return int(self.mask.sum().item())


@dataclass
class StepStats:
    """Global statistics of one optimizer step (identical on every rank after `reduce`)."""
    ce_sum: float = 0.0
    n_tokens: int = 0
    lb_sum: float = 0.0  # summed over layers and micro-batches
    z_sum: float = 0.0
    n_micro: int = 0  # micro-batches in the global batch
    tokens_per_expert: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [L, E]
    dropped: int = 0
    layers: int = 1

    @property
    def loss(self) -> float:
        return self.ce_sum / max(self.n_tokens, 1)

    @property
    def lb_loss(self) -> float:
        return self.lb_sum / max(self.n_micro * self.layers, 1)

    @property
    def z_loss(self) -> float:
        return self.z_sum / max(self.n_micro * self.layers, 1)


class LocalStats:
    """Per-rank partial sums; each quantity is added by exactly one rank in the world.
    Values stay on their device until `reduce`, so a step synchronises the GPU once."""

    def __init__(self, layers: int, experts: int):
        self.layers, self.experts = layers, experts
        self.ce: list[torch.Tensor] = []
        self.routing: list[tuple[int, Routing]] = []

    def add_ce(self, ce_sum: torch.Tensor) -> None:
        self.ce.append(ce_sum.detach())

    def add_routing(self, layer: int, r: Routing) -> None:
        self.routing.append((layer, r))

    def reduce(self, n_tokens: int, n_micro: int, device, group=None) -> StepStats:
        flat = torch.zeros(4 + self.layers * self.experts, dtype=torch.float64, device=device)
        for ce in self.ce:
            flat[0] += ce.double()
        tpe = flat[4:].view(self.layers, self.experts)
        for layer, r in self.routing:
            flat[1] += r.lb_loss.detach().double()
            flat[2] += r.z_loss.detach().double()
            flat[3] += r.dropped.double()
            tpe[layer] += r.tokens_per_expert.double()
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(flat, group=group)  # float64 keeps counts exact on gloo and NCCL
        flat = flat.cpu()
        return StepStats(ce_sum=float(flat[0]), n_tokens=n_tokens, lb_sum=float(flat[1]),
                         z_sum=float(flat[2]), n_micro=n_micro,
                         tokens_per_expert=flat[4:].view(self.layers, self.experts).round().long(),
                         dropped=int(round(float(flat[3]))), layers=self.layers)


@dataclass
class Generation:
    tokens: torch.Tensor  # [B, new_tokens] greedy ids
    prefill_s: float
    token_s: list[float]  # seconds between consecutive tokens reaching the host (see stream_tokens)


class StaticDecoder:
    """Greedy decoding with a fixed-shape step `step(ids [B, 1], pos [1]) -> next ids [B]`.

    Each call advances one token: the step reads the ids and position from its own buffers and
    writes the next ones back, so on a GPU the whole step is captured once in a CUDA graph and
    a token costs one graph launch instead of hundreds of kernel launches. The warm-up needed
    before capture writes the cache slot of the start position, which the first token rewrites.
    """

    def __init__(self, step, ids: torch.Tensor, pos: torch.Tensor, cuda_graph: bool):
        self.step, self.ids, self.pos = step, ids.clone(), pos.clone()
        self.graph = None
        if cuda_graph and ids.is_cuda:
            side = torch.cuda.Stream(ids.device)
            side.wait_stream(torch.cuda.current_stream(ids.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up (lazy initialisation) must precede capture
                    self.step(self.ids, self.pos)
            torch.cuda.current_stream(ids.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._advance()

    def _advance(self) -> None:
        self.ids.copy_(self.step(self.ids, self.pos)[:, None])
        self.pos.add_(1)

    def __call__(self) -> torch.Tensor:
        """Decode one token; returns the new ids [B] (a view of the buffer: clone to keep)."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._advance()
        return self.ids[:, 0]


def stream_tokens(decoder: StaticDecoder, n: int, context=nullcontext) -> tuple[list[torch.Tensor], list[float]]:
    """Decode `n` tokens as a server streams them: token i + 1 is queued on the device before
    the host waits for token i, whose ids reach pinned host memory behind its step, so the
    device never idles while the host reads. Returns each token's ids (on the host) and the
    seconds between consecutive arrivals (the first from the call): the inter-token latency a
    client sees. `context()` wraps each step (autocast, for steps that are not a CUDA graph)."""
    if not decoder.ids.is_cuda:  # each step runs to completion anyway
        out, times = [], []
        for _ in range(n):
            t = time.perf_counter()
            with context():
                out.append(decoder().clone())
            times.append(time.perf_counter() - t)
        return out, times
    host = torch.empty((n, decoder.ids.shape[0]), dtype=decoder.ids.dtype, pin_memory=True)
    arrived, times = [], []
    last = time.perf_counter()
    for i in range(n + 1):
        if i < n:
            with context():
                host[i].copy_(decoder(), non_blocking=True)
            arrived.append(torch.cuda.Event())
            arrived[-1].record()
        if i > 0:  # token i is queued: now wait for token i - 1
            arrived[i - 1].synchronize()
            now = time.perf_counter()
            times.append(now - last)
            last = now
    return list(host.unbind(0)), times


class Strategy(ABC):
    """A parallel strategy holding its share of one `MoETransformer`.

    Subclasses receive the full, initialised model on the CPU and keep only their part.
    """

    name = "base"

    def __init__(self, cfg: Config, layout: Layout, rank: int, device: torch.device):
        self.cfg, self.layout, self.rank, self.device = cfg, layout, rank, torch.device(device)

    # ---- what the trainer uses
    @abstractmethod
    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """Local parameters, named as in the full model."""

    @abstractmethod
    def forward_backward(self, batch: GlobalBatch) -> StepStats:
        """Forward and backward over this rank's share of the global batch; on return every
        local parameter holds its full global-batch gradient."""

    @abstractmethod
    def evaluate(self, batch: GlobalBatch) -> tuple[float, int]:
        """Global (ce_sum, n_valid_tokens) of the batch, no gradients, dropout off."""

    @abstractmethod
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> Generation:
        """Greedy decoding with a KV cache; every rank returns the same tokens."""

    def timed_tokens(self, next_token: Callable[[int], Optional[torch.Tensor]],
                     n: int) -> tuple[list[Optional[torch.Tensor]], list[float]]:
        """Call `next_token(i)` (under autocast) for i < n, each timed until the device is done:
        (what each call returned, seconds per call)."""
        out, times = [], []
        for i in range(n):
            t = time.perf_counter()
            with self.autocast():
                out.append(next_token(i))
            sync(self.device)
            times.append(time.perf_counter() - t)
        return out, times

    def stream_tokens(self, decoder: StaticDecoder, n: int) -> tuple[list[torch.Tensor], list[float]]:
        return stream_tokens(decoder, n, self.autocast)

    def decode_path(self) -> str:
        """How `generate` decodes, for benchmark tables. Multi-rank steps hold collectives or
        point-to-point transfers, whose capture in a CUDA graph is not verified yet."""
        return "fixed-shape step, no CUDA graph (prefill eager)"

    def replication(self, name: str) -> int:
        """How many ranks hold an identical copy of parameter `name` (for the global norm)."""
        return 1

    def train(self, mode: bool = True) -> None:
        for m in self.modules():
            m.train(mode)

    def modules(self) -> list[torch.nn.Module]:
        return []

    def checkpoint_key(self, name: str) -> str:
        """Key of a local parameter in a checkpoint; shards of one parameter need distinct keys."""
        return name

    # ---- shared helpers
    def compute_dtype(self) -> torch.dtype:
        """bf16 autocast on GPU ("auto") or when asked; fp32 otherwise (CPU default)."""
        dtype = self.cfg.train.dtype
        if dtype == "bf16" or (dtype == "auto" and self.device.type == "cuda"):
            return torch.bfloat16
        return torch.float32

    def autocast(self):
        if self.compute_dtype() == torch.bfloat16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def grad_norm(self) -> float:
        """Global L2 norm of all gradients, each parameter counted once over the world."""
        named = [(n, p.grad) for n, p in self.named_parameters() if p.grad is not None]
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        if named:
            # One fused pass over all gradients (fp32 norms, summed in fp64 with their weights).
            norms = torch._foreach_norm([g.detach() for _, g in named])
            weights = torch.tensor([1.0 / self.replication(n) for n, _ in named], dtype=torch.float64,
                                   device=self.device)
            total = (torch.stack(norms).double().pow(2) * weights).sum()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
        return float(total.sqrt())

    def clip_gradients(self, max_norm: float) -> float:
        norm = self.grad_norm()
        if max_norm > 0 and norm > max_norm:
            scale = max_norm / (norm + 1e-6)
            for _, p in self.named_parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
        return norm

    @torch.no_grad()
    def cast_parameters(self, dtype: torch.dtype) -> None:
        """Hold weights in `dtype` (inference in bf16 reads half the bytes of fp32 weights).
        Buffers such as the rotary tables keep their precision."""
        for _, p in self.named_parameters():
            drop_weight_copy(p)
            p.data = p.data.to(dtype)

    def aux_coefficients(self) -> tuple[float, float]:
        return self.cfg.model.lb_coef, self.cfg.model.z_coef
