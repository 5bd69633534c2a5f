"""What a parallel strategy offers the strategy-blind train and decode loops.

Global-batch semantics (identical on one rank and on many):
- The optimizer step sees a global batch of G sequences cut into G / micro_batch micro-batches.
  Every rank receives the whole global batch and takes the micro-batches its role needs
  (a data-parallel replica takes a contiguous block of them).
- The language-model loss is the mean cross-entropy over all valid (mask = 1) target tokens of
  the global batch: each micro-batch contributes ce_sum / n_valid_global.
- The auxiliary losses are computed per micro-batch (the valid tokens one replica routes in one
  forward: padding is not routed), summed over layers, and averaged over the micro-batches:
  loss += (lb_coef * sum_layers lb + z_coef * sum_layers z) / n_micro_total.
- Gradients of a parameter are summed (not averaged) over the ranks that computed parts of them.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist

from masep.config import Config
from masep.model import Routing, drop_weight_copy, lm_loss_sum
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


def stream_tokens(decoder: StaticDecoder, n: int, context=nullcontext,
                  on_token: Optional[Callable[[], None]] = None) -> tuple[list[torch.Tensor], list[float]]:
    """Decode `n` tokens as a server streams them: token i + 1 is queued on the device before
    the host waits for token i, whose ids reach pinned host memory behind its step, so the
    device never idles while the host reads. Returns each token's ids (on the host) and the
    seconds between consecutive arrivals (the first from the call): the inter-token latency a
    client sees. `context()` wraps each step (autocast, for steps that are not a CUDA graph);
    `on_token()` is called as each token arrives (decode progress, outside the timed span)."""
    if not decoder.ids.is_cuda:  # each step runs to completion anyway
        out, times = [], []
        for _ in range(n):
            t = time.perf_counter()
            with context():
                out.append(decoder().clone())
            times.append(time.perf_counter() - t)
            if on_token is not None:
                on_token()
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
            if on_token is not None:
                on_token()
            last = time.perf_counter() if on_token is not None else now
    return list(host.unbind(0)), times


class LossTerms:
    """The global-batch contract for one micro-batch's share of the step loss (module docstring):
    ce_sum / n_valid_global for the logits given, plus (lb_coef * sum lb + z_coef * sum z) /
    n_micro_total for the layers' routings given. It adds what it sees to `stats` when `counts`
    (else another rank counts the same numbers)."""

    def __init__(self, n_valid: int, n_micro: int, cfg, stats: LocalStats, counts: bool):
        self.n_valid, self.n_micro, self.stats, self.counts = n_valid, n_micro, stats, counts
        self.lb_coef, self.z_coef = cfg.lb_coef, cfg.z_coef

    def __call__(self, routings: Iterable[tuple[int, Routing]] = (), logits: Optional[torch.Tensor] = None,
                 mb: Optional[GlobalBatch] = None, ce: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """`ce`: the micro-batch's ce_sum where a strategy computes it without full logits."""
        routings, loss = list(routings), None
        if routings:
            loss = sum(self.lb_coef * r.lb_loss + self.z_coef * r.z_loss for _, r in routings) / self.n_micro
        if self.counts:
            for layer, r in routings:
                self.stats.add_routing(layer, r)
        if logits is not None:
            ce = lm_loss_sum(logits, mb.targets, mb.mask)
        if ce is not None:
            if self.counts:
                self.stats.add_ce(ce)
            loss = ce / max(self.n_valid, 1) + (0 if loss is None else loss)
        return loss


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


class Strategy(ABC):
    """A parallel strategy holding its share of one `MoETransformer`.

    The step, evaluation and `generate` are written here, once; a strategy supplies hooks:
    - its constructor shards the model (it receives the full, initialised model on the CPU and
      keeps only its part) and sets `replica` / `replicas` (its data-parallel share);
    - `modules()` (and `named_parameters()` where names differ from the modules'), `replication`,
      `checkpoint_key`, `adds_stats` (whether this rank counts the statistics it computes);
    - training: `run_schedule` (forward and backward of my micro-batches, every loss term from
      the `LossTerms` it is given), `forward_only` (evaluation), `reduce_gradients`;
    - decoding: `decode_rows` (the prompt rows this rank decodes), `new_caches`, `prefill`,
      `decode_step` (fixed shapes, no host sync), `answers` (whether this rank's tokens are the
      answer for its rows), and for ranks without rows `serve_prefill` / `serve_decode`.
    """

    name = "base"
    replica, replicas = 0, 1  # this rank's data-parallel replica: it takes block `replica` of the micro-batches
    world_group = None  # the group of every rank taking part (None: the default group; ma.failover replaces it)

    def __init__(self, cfg: Config, layout: Layout, rank: int, device: torch.device):
        self.cfg, self.layout, self.rank, self.device = cfg, layout, rank, torch.device(device)

    # ---- hooks: what the strategy holds
    @abstractmethod
    def modules(self) -> list[torch.nn.Module]:
        """The modules this rank holds."""

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """Local parameters, named as in the full model."""
        return [np for m in self.modules() for np in m.named_parameters()]

    def replication(self, name: str) -> int:
        """How many ranks hold an identical copy of parameter `name` (for the global norm)."""
        return 1

    def checkpoint_key(self, name: str) -> str:
        """Key of a local parameter in a checkpoint; shards of one parameter need distinct keys."""
        return name

    def checkpoint_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(checkpoint key, parameter) of every local parameter."""
        return [(self.checkpoint_key(n), p) for n, p in self.named_parameters()]

    def adds_stats(self) -> bool:
        """Whether this rank adds the statistics it computes (one rank of those computing the same)."""
        return True

    # ---- hooks: training
    def forward(self, mb: GlobalBatch) -> tuple[torch.Tensor, list[Routing]]:
        """Logits and routings of a micro-batch through this rank's model (the default schedule's;
        padding, mask 0, is not routed)."""
        raise NotImplementedError

    def run_schedule(self, mbs: list[GlobalBatch], loss: LossTerms) -> None:
        """Forward and backward of my micro-batches. Default: gradient accumulation through `forward`."""
        for mb in mbs:
            with self.autocast():
                logits, routings = self.forward(mb)
            term = loss(enumerate(routings), logits, mb)
            if torch.is_grad_enabled():
                term.backward()

    def forward_only(self, mbs: list[GlobalBatch], loss: LossTerms) -> None:
        """Forward of my share of an evaluation batch (no gradients; `loss` counts the ce)."""
        self.run_schedule(mbs, loss)

    def reduce_gradients(self) -> None:
        """Sum the local gradients over the ranks that computed parts of them."""

    def my_microbatches(self, mbs: list[GlobalBatch], exact: bool = True) -> list[GlobalBatch]:
        """My replica's contiguous block (`exact`: the layout's count, as training needs)."""
        n, m = len(mbs), self.layout.microbatches
        if exact and n != m * self.replicas:
            raise ValueError(f"{self.name}: the global batch has {n} micro-batches, the layout expects "
                             f"{m} per replica x {self.replicas} replicas")
        return mbs[self.replica * n // self.replicas:(self.replica + 1) * n // self.replicas]

    # ---- hooks: between steps, checkpoints and result rows
    def after_step(self, step: int, opt: torch.optim.Optimizer) -> None:
        """Runs on every rank after the optimizer step of `step` (before the gradients are
        cleared), e.g. to move work between ranks; it must not change what the model computes."""

    def extra_state(self) -> dict:
        """What a checkpoint keeps besides parameters and optimizer state: tensors (loaded in
        place; a key shared by ranks is stored once) and bytes (per rank)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """`extra_state()`'s keys as read from a checkpoint."""

    def write_rows(self, run_dir, run_id: str) -> None:
        """Write this rank's own result tables into the run folder (atomically, all rows so far)."""

    # ---- hooks: decoding
    def decode_rows(self, batch: int) -> slice:
        """The rows of the prompt batch this rank decodes (may be empty)."""
        return slice(0, batch)

    def answers(self) -> bool:
        """Whether this rank's tokens are the answer for its rows (one rank per row)."""
        return self.rank == 0

    def new_caches(self, batch: int, max_len: int) -> list:
        """KV caches of this rank's layers and heads."""
        raise NotImplementedError

    def prefill(self, ids: torch.Tensor, caches) -> torch.Tensor:
        """The prompt rows `ids` [b, T] through the model: the next ids [b]."""
        raise NotImplementedError

    def decode_step(self, ids: torch.Tensor, pos: torch.Tensor, caches) -> torch.Tensor:
        """One token [b, 1] at device position `pos` [1], fixed shapes: the next ids [b]."""
        raise NotImplementedError

    def serve_prefill(self, batch: int) -> None:
        """A rank without rows takes part in the prefill of a prompt batch of `batch` rows."""

    def serve_decode(self, n: int, batch: int) -> list[float]:
        """A rank without rows takes part in `n` decode steps; seconds per step (or zeros)."""
        return [0.0] * n

    def decoding(self, batch: int):
        """Context of the decode steps of a prompt batch of `batch` rows."""
        return nullcontext()

    def cuda_graph(self) -> bool:
        """Whether the decode step is replayed as a CUDA graph (steps holding collectives or
        point-to-point transfers are not: their capture is not verified yet)."""
        return False

    def decoder(self, ids: torch.Tensor, pos: torch.Tensor, caches) -> StaticDecoder:
        return StaticDecoder(lambda i, p: self.decode_step(i, p, caches), ids, pos, self.cuda_graph())

    def decode_path(self) -> str:
        """How `generate` decodes, for benchmark tables."""
        return "fixed-shape step in a CUDA graph" if self.cuda_graph() else \
            "fixed-shape step, no CUDA graph (prefill eager)"

    # ---- what the trainer uses, written once
    def _loss_terms(self, batch: GlobalBatch, n_micro: int) -> LossTerms:
        m = self.cfg.model
        return LossTerms(batch.n_valid(), n_micro, m, LocalStats(m.layers, m.experts), self.adds_stats())

    def forward_backward(self, batch: GlobalBatch) -> StepStats:
        """Forward and backward over this rank's share of the global batch; on return every
        local parameter holds its full global-batch gradient."""
        batch = batch.to(self.device)
        mbs = batch.microbatches(self.layout.microbatch_size)
        loss = self._loss_terms(batch, len(mbs))
        self.run_schedule(self.my_microbatches(mbs), loss)
        for _, p in self.named_parameters():  # a parameter no token reached has a zero gradient
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.reduce_gradients()
        return loss.stats.reduce(loss.n_valid, len(mbs), self.device, self.world_group)

    @torch.no_grad()
    def evaluate(self, batch: GlobalBatch) -> tuple[float, int]:
        """Global (ce_sum, n_valid_tokens) of the batch, no gradients, dropout off."""
        batch = batch.to(self.device)
        mbs = batch.microbatches(self.layout.microbatch_size)
        loss = self._loss_terms(batch, len(mbs))
        with self.eval_mode():
            self.forward_only(self.my_microbatches(mbs, exact=False), loss)
        return loss.stats.reduce(loss.n_valid, len(mbs), self.device, self.world_group).ce_sum, loss.n_valid

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int,
                 on_token: Optional[Callable[[], None]] = None) -> Generation:
        """Greedy decoding with a KV cache; every rank returns the same tokens: an eager
        prefill, then the fixed-shape step under `StaticDecoder`, streamed (`stream_tokens`;
        `on_token` is called on each rank that decodes rows as each of its tokens arrives)."""
        B, T0 = prompt.shape
        rows = self.decode_rows(B)
        ids = prompt[rows].to(self.device)
        active = ids.shape[0] > 0
        with self.eval_mode():
            caches = self.new_caches(ids.shape[0], T0 + new_tokens) if active else None
            if world_size() > 1:
                dist.barrier()  # every rank starts the clock together
            sync(self.device)
            t0 = time.perf_counter()
            with self.autocast():
                first = self.prefill(ids, caches) if active else self.serve_prefill(B)
            sync(self.device)
            prefill_s = time.perf_counter() - t0
            with self.decoding(B):
                if active:
                    with self.autocast():
                        decoder = self.decoder(first[:, None], torch.tensor([T0], device=self.device), caches)
                    rest, times = self.stream_tokens(decoder, new_tokens - 1, on_token)
                else:
                    times = self.serve_decode(new_tokens - 1, B)
        if world_size() == 1:
            return Generation(torch.stack([first.cpu()] + rest, 1), prefill_s, times)
        tokens = torch.zeros(B, new_tokens, dtype=torch.long, device=self.device)
        if active and self.answers():
            tokens[rows] = torch.stack([first.cpu()] + rest, 1).to(self.device)
        dist.all_reduce(tokens)  # one rank answers for each row: the sum is every row's tokens
        return Generation(tokens.cpu(), prefill_s, times)

    @contextmanager
    def eval_mode(self):
        was = [m.training for m in self.modules()]
        self.train(False)
        try:
            yield
        finally:
            for m, mode in zip(self.modules(), was):
                m.train(mode)

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

    def stream_tokens(self, decoder: StaticDecoder, n: int,
                      on_token: Optional[Callable[[], None]] = None) -> tuple[list[torch.Tensor], list[float]]:
        return stream_tokens(decoder, n, self.autocast, on_token)

    def train(self, mode: bool = True) -> None:
        for m in self.modules():
            m.train(mode)

    def is_lead(self) -> bool:
        """Whether this rank writes what one rank writes for the job: rank 0, or after a
        failover (`world_group` set) the lowest surviving rank."""
        if self.world_group is None:
            return self.rank == 0
        return self.rank == min(dist.get_process_group_ranks(self.world_group))

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
            dist.all_reduce(total, group=self.world_group)
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
