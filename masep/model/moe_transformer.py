"""The paper's Mixture-of-Experts transformer, written once and without any process group.

Choices where the paper is silent (see docs/ARCHITECTURE.md): pre-norm RMSNorm, rotary
positions, no biases, untied output head by default, top-k weights renormalised to sum to 1.
Parallel strategies (masep.parallel) keep this code and replace only *where* pieces run:
they call `Block.attention_residual` and `Block.moe_residual` with their own `expert_fn`.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from masep.config import ModelConfig

# expert_fn(x_sorted [M, H], counts [E] (tokens per expert, in expert order)) -> y_sorted [M, H]
ExpertFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------ low-precision weights

_LOW_COPY = "_masep_low_copy"  # attribute of a weight: ((data_ptr, version), low-precision leaf)


def compute_weight(p: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """`p` in the compute dtype (autocast's, unless `dtype` is given).

    Under autocast every micro-batch would cast each fp32 weight again and send its gradient
    back through a cast and a separate accumulation: ~24 bytes of memory traffic per parameter
    per micro-batch. Here the copy is made once per weight version (the optimizer's in-place
    update bumps it) and is a leaf of its own; a hook adds each micro-batch's bf16 gradient
    straight into the fp32 `p.grad` (~10 bytes per parameter), so strategies and the optimizer
    see fp32 gradients exactly where they did before.
    """
    if dtype is None:
        if not torch.is_autocast_enabled(p.device.type):
            return p
        dtype = torch.get_autocast_dtype(p.device.type)
    if p.dtype == dtype:
        return p
    if not (p.requires_grad and torch.is_grad_enabled()):
        return p.to(dtype)
    key = (p.data_ptr(), p._version, dtype)
    hit = getattr(p, _LOW_COPY, None)
    if hit is not None and hit[0] == key:
        return hit[1]
    low = p.detach().to(dtype).requires_grad_()
    low.register_post_accumulate_grad_hook(_grad_into(weakref.ref(p)))
    setattr(p, _LOW_COPY, (key, low))
    return low


def drop_weight_copy(p: torch.Tensor) -> None:
    """Free the cached low-precision copy of `p` (e.g. once the weights themselves are bf16)."""
    if hasattr(p, _LOW_COPY):
        delattr(p, _LOW_COPY)


def _grad_into(param_ref):
    def hook(low: torch.Tensor) -> None:
        p = param_ref()
        if p is not None:
            if p.grad is None:
                p.grad = low.grad.to(p.dtype)
            else:
                p.grad.add_(low.grad)
        low.grad = None
    return hook


# ------------------------------------------------------------------ positions


def rotary_tables(head_dim: int, max_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64, device=device), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, D]; cos/sin: [T, D/2]. Rotates interleaved-free halves (GPT-NeoX style)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


# ------------------------------------------------------------------ attention


@dataclass
class KVCache:
    """Pre-allocated keys and values of one attention module: [B, local heads, max_len, D]."""
    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def empty(cls, batch: int, heads: int, max_len: int, head_dim: int, dtype, device) -> "KVCache":
        shape = (batch, heads, max_len, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))


class Attention(nn.Module):
    """Causal multi-head self-attention over `n_heads` heads of `head_dim`.

    `n_heads` may be a subset of the model's heads (tensor parallelism); the output
    projection then yields a partial sum that the caller reduces.
    """

    def __init__(self, hidden: int, n_heads: int, head_dim: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        # Fused q|k|v rows, each block ordered by head: rows [s*H*D + h*D : ... + D] for s in q,k,v.
        self.qkv = nn.Linear(hidden, 3 * n_heads * head_dim, bias=False)
        self.out = nn.Linear(n_heads * head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int = 0,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self._qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = apply_rotary(q, cos[start_pos:start_pos + T], sin[start_pos:start_pos + T])
        k = apply_rotary(k, cos[start_pos:start_pos + T], sin[start_pos:start_pos + T])
        if cache is not None:
            cache.k[:, :, start_pos:start_pos + T] = k
            cache.v[:, :, start_pos:start_pos + T] = v
            k, v = cache.k[:, :, :start_pos + T], cache.v[:, :, :start_pos + T]
        if start_pos == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v)  # one new token sees the whole cache
        else:
            total = start_pos + T
            mask = torch.ones(T, total, dtype=torch.bool, device=x.device).tril(diagonal=start_pos)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self._out(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def _qkv(self, x):
        return F.linear(x, compute_weight(self.qkv.weight))

    def _out(self, y):
        return F.linear(y, compute_weight(self.out.weight))

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
               cache: KVCache) -> torch.Tensor:
        """One new token per sequence at position `pos` (a 1-element device tensor): static
        shapes and no host synchronisation, so the step can be captured in a CUDA graph. The
        token attends to the whole pre-allocated cache with the positions after `pos` masked."""
        B = x.shape[0]
        q, k, v = self._qkv(x).view(B, 1, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        c, s_ = cos.index_select(0, pos), sin.index_select(0, pos)
        q, k = apply_rotary(q, c, s_), apply_rotary(k, c, s_)
        cache.k.index_copy_(2, pos, k.to(cache.k.dtype))
        cache.v.index_copy_(2, pos, v.to(cache.v.dtype))
        visible = (torch.arange(cache.k.shape[2], device=x.device) <= pos).view(1, -1)  # [1, max_len]
        y = F.scaled_dot_product_attention(q, cache.k.to(q.dtype), cache.v.to(q.dtype), attn_mask=visible)
        return self._out(y.transpose(1, 2).reshape(B, 1, self.n_heads * self.head_dim))


# ------------------------------------------------------------------ experts


class Experts(nn.Module):
    """`n_experts` SwiGLU (or GELU) feed-forward experts stored as stacked weights.

    Tokens arrive sorted by expert with `counts` per expert; all experts run as one grouped
    matrix product (`torch._grouped_mm`) where torch offers it, else a loop over experts.
    """

    def __init__(self, n_experts: int, hidden: int, ffn: int, activation: str = "swiglu", dropout: float = 0.0):
        super().__init__()
        self.n_experts, self.activation, self.dropout = n_experts, activation, dropout
        up_width = 2 * ffn if activation == "swiglu" else ffn
        self.w_up = nn.Parameter(torch.empty(n_experts, hidden, up_width))
        self.w_down = nn.Parameter(torch.empty(n_experts, ffn, hidden))

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return F.dropout(h, self.dropout, self.training)

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return self._compute(x_sorted, counts)

    def _compute(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if x_sorted.shape[0] == 0:
            return x_sorted.clone()  # no rows: nothing to compute, graph stays connected to x
        x_sorted = self._in_compute_dtype(x_sorted)
        if use_grouped_mm(x_sorted):
            return self._grouped(x_sorted, counts)
        # unbind (not w[e]) so backward stacks the expert gradients once instead of once per expert
        w_up = compute_weight(self.w_up, x_sorted.dtype).unbind(0)
        w_down = compute_weight(self.w_down, x_sorted.dtype).unbind(0)
        outs = [self._act(xe @ w_up[e]) @ w_down[e]
                for e, xe in enumerate(x_sorted.split(counts.tolist())) if xe.shape[0]]
        return torch.cat(outs)

    def forward_leading(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Fixed shapes (decode steps): the experts' rows are the leading sum(counts) rows of
        `x`, in expert order; the other rows come back as zeros."""
        x = self._in_compute_dtype(x)
        if use_grouped_mm(x):  # rows after the last offset are outside every group: masked
            valid = torch.arange(x.shape[0], device=x.device) < counts.sum()
            return torch.where(valid.unsqueeze(1), self._grouped(x, counts), 0.0)
        n = int(counts.sum())
        y = self._compute(x[:n], counts)
        return torch.cat([y, y.new_zeros(x.shape[0] - n, y.shape[1])])

    def forward_block(self, x_sorted: torch.Tensor, counts: torch.Tensor, first: int) -> torch.Tensor:
        """Fixed shapes: `x_sorted` holds rows of all experts sorted by expert (`counts` [all
        experts]); these experts are experts [first, first + n_experts) of the layer. Their
        block is rotated to the front, computed, and rotated back; other rows come back as 0."""
        M = x_sorted.shape[0]
        starts = torch.cumsum(counts, 0) - counts
        idx = (torch.arange(M, device=x_sorted.device) + starts[first]) % M
        y = self.forward_leading(x_sorted.index_select(0, idx), counts[first:first + self.n_experts])
        return torch.zeros_like(y).index_copy_(0, idx, y)

    def _in_compute_dtype(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            # The grouped kernel is outside autocast's op list: cast as autocast would.
            return x.to(torch.get_autocast_dtype(x.device.type))
        return x

    def _grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offs = torch.cumsum(counts, 0).to(torch.int32)
        w_up, w_down = compute_weight(self.w_up, x.dtype), compute_weight(self.w_down, x.dtype)
        h = torch._grouped_mm(x, w_up, offs=offs)
        return torch._grouped_mm(self._act(h), w_down, offs=offs)


def use_grouped_mm(x: torch.Tensor) -> bool:
    # The CUDA kernel wants bf16 and 16-byte aligned strides; the CPU loop is the exact reference.
    return (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16
            and x.shape[1] % 8 == 0)


# ------------------------------------------------------------------ routing


@dataclass
class Routing:
    """Where each token goes. Assignments are (token, choice) pairs, k per token."""
    expert: torch.Tensor  # [N, k] long
    weight: torch.Tensor  # [N, k] combine weights (renormalised top-k probabilities)
    keep: torch.Tensor  # [N, k] bool: False where the expert's capacity was exceeded
    lb_loss: torch.Tensor  # scalar, Switch load-balancing loss (without its coefficient)
    z_loss: torch.Tensor  # scalar, ST-MoE router z-loss (without its coefficient)
    tokens_per_expert: torch.Tensor  # [E] long, kept assignments
    dropped: torch.Tensor  # scalar long, assignments dropped by capacity


def expert_capacity(n_tokens: int, n_experts: int, top_k: int, factor: Optional[float]) -> Optional[int]:
    """Assignments one expert may take from a group of `n_tokens` tokens (None: dropless)."""
    if factor is None:
        return None
    return max(1, math.ceil(factor * n_tokens * top_k / n_experts))


def routed_positions(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The positions to route, [B*T] bool, from a loss mask [B, T] (padding is 0); None when
    all are (packed batches: then routing needs no host sync for it)."""
    if mask is None:
        return None
    valid = mask.reshape(-1) > 0
    return None if bool(valid.all()) else valid


def route(logits: torch.Tensor, top_k: int, capacity_factor: Optional[float],
          valid: Optional[torch.Tensor] = None) -> Routing:
    """Top-k softmax routing with Switch and ST-MoE auxiliary losses over the N given tokens.
    `valid` [N] bool: only these tokens are routed (padding is not: it takes no capacity, adds
    nothing to the aux losses or counts, and goes to no expert).

    lb_loss = E * sum_i f_i * P_i, with f_i the share of the N*k assignments that chose expert i
    and P_i the mean router probability of expert i (Fedus et al. 2021, generalised to top-k).
    z_loss = mean_n (logsumexp_i logits[n, i])^2 (Zoph et al. 2022).
    Capacity: first choices are served before second choices, earlier tokens first.
    """
    if valid is not None:
        sub = route(logits[valid], top_k, capacity_factor)
        rows = valid[:, None].expand(-1, top_k)

        def full(t):  # padding's rows: expert 0, weight 0, not kept
            return t.new_zeros(rows.shape).masked_scatter(rows, t)
        return replace(sub, expert=full(sub.expert), weight=full(sub.weight), keep=full(sub.keep))
    logits = logits.float()
    N, E = logits.shape
    probs = logits.softmax(dim=-1)
    top_p, top_e = probs.topk(top_k, dim=-1)
    weight = top_p / top_p.sum(dim=-1, keepdim=True)

    assigned = F.one_hot(top_e, E).sum(dim=1).float()  # [N, E] 0/1
    f = assigned.sum(0) / (N * top_k)
    lb_loss = E * (f * probs.mean(0)).sum()
    z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()

    cap = expert_capacity(N, E, top_k, capacity_factor)
    if cap is None or cap >= N:
        # Top-k experts are distinct, so an expert gets at most one assignment per token: with
        # room for N nothing can be dropped (a decode step of one sequence, for instance).
        keep = torch.ones_like(top_e, dtype=torch.bool)
    else:
        # Position of each assignment in its expert's queue, choice-major then token order:
        # a stable sort by expert keeps that order inside each expert's group. Counts come from
        # scatter_add (bincount would read its maximum back to the host).
        flat = top_e.T.reshape(-1)  # [k*N]
        order = torch.argsort(flat, stable=True)
        counts = _count(flat, E)
        starts = torch.cumsum(counts, 0) - counts
        position = torch.empty_like(flat)
        position[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
        keep = (position < cap).view(top_k, N).T
    tokens_per_expert = _count(top_e.reshape(-1), E, keep.reshape(-1).long())
    dropped = (~keep).sum()
    return Routing(top_e, weight, keep, lb_loss, z_loss, tokens_per_expert, dropped)


def _count(expert: torch.Tensor, n_experts: int, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-expert sum of `weight` (default 1) over the flat `expert` ids, without a host sync."""
    ones = weight if weight is not None else torch.ones_like(expert)
    return torch.zeros(n_experts, dtype=torch.long, device=expert.device).scatter_add_(0, expert, ones)


@dataclass
class ExpertOrder:
    """The kept assignments sorted by expert (stable: token order inside an expert's rows)."""
    tok: torch.Tensor  # [M] token of each row
    weight: torch.Tensor  # [M] its combine weight
    counts: torch.Tensor  # [E] rows per expert


def sort_by_expert(routing: Routing, n_experts: int) -> ExpertOrder:
    N = routing.expert.shape[0]
    tok = torch.arange(N, device=routing.expert.device).unsqueeze(1).expand_as(routing.expert)[routing.keep]
    exp = routing.expert[routing.keep]
    order = torch.argsort(exp, stable=True)
    return ExpertOrder(tok[order], routing.weight[routing.keep][order], _count(exp[order], n_experts))


def combine(y_sorted: torch.Tensor, tok: torch.Tensor, weight: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per token (rows of `like`), the sum of its rows' expert outputs times their weights."""
    out = torch.zeros_like(like)
    return out.index_add(0, tok, (y_sorted.float() * weight.unsqueeze(1)).to(like.dtype))


def dispatch_combine(x: torch.Tensor, routing: Routing, expert_fn: ExpertFn, n_experts: int) -> torch.Tensor:
    """Sort kept assignments by expert, run `expert_fn`, and sum weighted outputs per token."""
    o = sort_by_expert(routing, n_experts)
    return combine(expert_fn(x.index_select(0, o.tok), o.counts), o.tok, o.weight, x)


def dispatch_combine_static(x: torch.Tensor, routing: Routing, expert_fn: ExpertFn, n_experts: int) -> torch.Tensor:
    """`dispatch_combine` with shapes fixed by the number of tokens (decode steps in a CUDA
    graph): every assignment is sent, those dropped by capacity with weight 0. The per-token
    sum adds the weighted outputs in the compute dtype, in expert order, as `index_add` does."""
    N, k = routing.expert.shape
    flat = routing.expert.reshape(-1)
    order = torch.argsort(flat, stable=True)
    y_sorted = expert_fn(x.index_select(0, order // k), _count(flat, n_experts))
    y = torch.empty_like(y_sorted).index_copy_(0, order, y_sorted).view(N, k, -1)
    w = torch.where(routing.keep, routing.weight, 0.0)
    terms = (y.float() * w.unsqueeze(-1)).to(x.dtype)  # [N, k, H], choice order
    # index_add visits a token's assignments in expert order; for k = 2 the sum is symmetric,
    # so choice order gives the same bits.
    return terms.sum(1) if k != 2 else terms[:, 0] + terms[:, 1]


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(cfg.hidden, cfg.experts, bias=False)
        self.experts = Experts(cfg.experts, cfg.hidden, cfg.expert_hidden, cfg.expert_activation,
                               cfg.expert_dropout)

    def route(self, x_flat: torch.Tensor, valid: Optional[torch.Tensor] = None) -> Routing:
        # The router runs in fp32 even under autocast: its softmax and z-loss need the range.
        with torch.autocast(device_type=x_flat.device.type, enabled=False):
            logits = F.linear(x_flat.float(), self.router.weight.float())
        return route(logits, self.cfg.top_k, self.cfg.capacity_factor, valid)

    def forward(self, x: torch.Tensor, expert_fn: Optional[ExpertFn] = None,
                valid: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Routing]:
        shape = x.shape
        x_flat = x.reshape(-1, shape[-1])
        routing = self.route(x_flat, valid)
        y = dispatch_combine(x_flat, routing, expert_fn or self.experts, self.cfg.experts)
        return y.view(shape), routing

    def decode(self, x: torch.Tensor, expert_fn: Optional[ExpertFn] = None) -> torch.Tensor:
        shape = x.shape
        x_flat = x.reshape(-1, shape[-1])
        y = dispatch_combine_static(x_flat, self.route(x_flat), expert_fn or self.experts, self.cfg.experts)
        return y.view(shape)


# ------------------------------------------------------------------ the model


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.attn = Attention(cfg.hidden, cfg.heads, cfg.head_dim)
        self.moe_norm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.moe = MoE(cfg)
        self.dropout = cfg.dropout

    def attention_residual(self, x, cos, sin, start_pos=0, cache=None):
        h = self.attn(self.attn_norm(x), cos, sin, start_pos, cache)
        return x + F.dropout(h, self.dropout, self.training)

    def moe_residual(self, x, expert_fn: Optional[ExpertFn] = None, valid: Optional[torch.Tensor] = None):
        h, routing = self.moe(self.moe_norm(x), expert_fn, valid)
        return x + F.dropout(h, self.dropout, self.training), routing

    def forward(self, x, cos, sin, start_pos=0, cache=None):
        x = self.attention_residual(x, cos, sin, start_pos, cache)
        return self.moe_residual(x)

    def decode(self, x, cos, sin, pos: torch.Tensor, cache: KVCache, expert_fn: Optional[ExpertFn] = None):
        """Inference-only step of one token (no dropout, routing statistics not kept)."""
        x = x + self.attn.decode(self.attn_norm(x), cos, sin, pos, cache)
        return x + self.moe.decode(self.moe_norm(x), expert_fn)


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.padded_vocab, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.hidden, cfg.padded_vocab, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(self.norm(x), compute_weight(self.head.weight)).float()
        # Padding rows of the vocabulary are never valid outputs.
        logits[..., self.cfg.vocab_size:] = float("-inf")
        return logits

    def forward(self, ids: torch.Tensor, start_pos: int = 0, caches: Optional[list[KVCache]] = None,
                last_only: bool = False, mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, list[Routing]]:
        """Logits [B, T, V] (or [B, 1, V] with `last_only`, as decoding needs) and each layer's
        routing; positions where `mask` [B, T] is 0 (padding) are not routed."""
        valid = routed_positions(mask)
        x = self.embed(ids)
        routings = []
        for i, block in enumerate(self.blocks):
            x = block.attention_residual(x, self.rope_cos, self.rope_sin, start_pos,
                                         caches[i] if caches is not None else None)
            x, routing = block.moe_residual(x, valid=valid)
            routings.append(routing)
        return self.logits(x[:, -1:] if last_only else x), routings

    @torch.no_grad()
    def decode_logits(self, ids: torch.Tensor, pos: torch.Tensor, caches: list[KVCache],
                      expert_fn: Optional[ExpertFn] = None) -> torch.Tensor:
        """Logits [B, V] of the token after `ids` [B, 1] at position `pos` (a 1-element long
        tensor on the model's device). Fixed shapes, no host synchronisation: capturable in a
        CUDA graph. Computes what `forward(ids, pos, caches, last_only=True)` computes, with
        the experts of `expert_fn` where given (fixed shapes too)."""
        x = self.embed(ids)
        for block, cache in zip(self.blocks, caches):
            x = block.decode(x, self.rope_cos, self.rope_sin, pos, cache, expert_fn)
        return self.logits(x)[:, -1]

    def decode_step(self, ids: torch.Tensor, pos: torch.Tensor, caches: list[KVCache],
                    expert_fn: Optional[ExpertFn] = None) -> torch.Tensor:
        """Greedy next ids [B] (see `decode_logits`)."""
        return self.decode_logits(ids, pos, caches, expert_fn).argmax(-1)

    def new_caches(self, batch: int, max_len: int, dtype=None, device=None) -> list[KVCache]:
        p = self.embed.weight
        return [KVCache.empty(batch, self.cfg.heads, max_len, self.cfg.head_dim, dtype or p.dtype, device or p.device)
                for _ in self.blocks]


# ------------------------------------------------------------------ initialisation and counting


@torch.no_grad()
def init_weights(model: MoETransformer, seed: int) -> None:
    """Deterministic init from `seed` (and the device type the weights live on): normal(0,
    init_std), output projections scaled by 1/sqrt(2 * layers) (GPT-2), norms at 1. Every
    strategy starts from these same weights."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    std = model.cfg.init_std
    out_std = std / math.sqrt(2 * model.cfg.layers)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
            continue
        s = out_std if name.endswith(("attn.out.weight", "w_down")) else std
        p.normal_(0.0, s, generator=gen)


def build_model(cfg: ModelConfig, seed: int, device="cpu") -> MoETransformer:
    """The full model, initialised directly on `device` (a GPU builds a large model in seconds)."""
    with torch.device(device):
        model = MoETransformer(cfg)
    init_weights(model, seed)
    return model


def analytic_parameter_count(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by part, from the dimensions alone (no tensors)."""
    H, L, E, F_ = cfg.hidden, cfg.layers, cfg.experts, cfg.expert_hidden
    up = 2 * F_ if cfg.expert_activation == "swiglu" else F_
    attn = L * (3 * H * H + H * H)
    experts = L * E * (H * up + F_ * H)
    routers = L * H * E
    norms = L * 2 * H + H
    embed = cfg.padded_vocab * H
    head = 0 if cfg.tie_embeddings else cfg.padded_vocab * H
    total = attn + experts + routers + norms + embed + head
    active_expert = L * cfg.top_k * (H * up + F_ * H)
    return {"attention": attn, "experts": experts, "routers": routers, "norms": norms,
            "embedding": embed, "head": head, "total": total,
            "active_matmul": attn + active_expert + routers + head}


def lm_loss_sum(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over the positions the mask marks (fp32)."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    return (ce * mask.reshape(-1).to(ce.dtype)).sum()
