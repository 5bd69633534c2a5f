"""The strategy-blind training loop.

AdamW (weight decay on matrices only), linear warm-up then cosine decay to
`min_lr_ratio * lr` (a function of the step alone), clipping at a global norm, the global batch accumulated by the strategy,
validation every `eval_every` steps, DCP checkpoints every `checkpoint_every` steps; a resumed
run reproduces the losses of an uninterrupted one exactly (batches are a function of the step,
RNG state is checkpointed).
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from masep.config import Config
from masep.model import build_model
from masep.parallel import build_strategy
from masep.parallel.base import GlobalBatch, Strategy, sync
from masep.parallel.comm import wait_works
from masep.parallel.grad_compression import set_grad_compression
from masep.parallel.layout import Layout, make_layout
from masep.runtime import checkpoint
from masep.telemetry.memory import memory_row, peak_bytes
from masep.telemetry.timing import CommTimer, set_comm_timer


def lr_lambda(cfg) -> Callable[[int], float]:
    t = cfg.train

    def factor(step: int) -> float:
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        span = max(t.decay_steps - t.warmup_steps, 1)
        progress = min(max(step - t.warmup_steps, 0) / span, 1.0)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_optimizer(strategy: Strategy, cfg, fused: Optional[bool] = None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; fused (the default on GPU) where `fused`."""
    t = cfg.train
    decay, no_decay = [], []
    for _, p in strategy.named_parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # The fused CUDA kernel reads each state tensor once per step; CPU keeps the reference loop.
    if fused is None:
        fused = strategy.device.type == "cuda"
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, fused=fused or None)
    if fused:
        opt.register_step_post_hook(_bump_versions)
    return opt


def _bump_versions(opt, args, kwargs) -> None:
    """The fused kernel updates weights in place without bumping their version counters, so
    `compute_weight` would keep serving the bf16 copies of the weights before the first step."""
    for group in opt.param_groups:
        for p in group["params"]:
            torch.autograd.graph.increment_version(p)


class Trainer:
    def __init__(self, cfg: Config, rank: int = 0, device: torch.device | str = "cpu",
                 layout: Optional[Layout] = None):
        self.cfg, self.rank, self.device = cfg, rank, torch.device(device)
        self.layout = layout or make_layout(cfg)
        if cfg.train.deterministic:
            # The eager switch only (training is never compiled): torch.use_deterministic_algorithms
            # also imports torch._inductor for its flag, a second of every rank's start-up.
            torch._C._set_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(cfg.train.seed)
        # Built where it will run: on GPU every rank initialises the full model in seconds, and
        # each strategy keeps only its part (on CPU the same code path keeps tests exact).
        model = build_model(cfg.model, cfg.train.seed, self.device)
        # Dropout streams differ per rank but are fixed by (seed, rank) and checkpointed.
        torch.manual_seed(cfg.train.seed * 1000 + rank)
        self.timer = CommTimer(self.device)
        set_comm_timer(self.timer)
        set_grad_compression(cfg.train.grad_compression)
        self.strategy = build_strategy(cfg, self.layout, rank, self.device, model)
        del model
        self.strategy.train(True)
        self.opt = make_optimizer(self.strategy, cfg)
        self.failover = None
        if cfg.ma.failover and cfg.parallel.strategy == "ma_sep" and dist.is_initialized() and dist.get_world_size() > 1:
            from masep.parallel.regroup import Failover

            self.failover = Failover(self.strategy, self.opt, rank, dist.get_world_size(), cfg.ma.failover_stale_s)
        self.lr_factor = lr_lambda(cfg)
        self.step = 0
        self.memory_at_first_step: dict = {}

    # ---- checkpoints
    def resume(self, ckpt_dir: Path) -> int:
        """Load the newest complete checkpoint, if any; return the step to continue from."""
        warn = (lambda line: print(f"masep train: {line}", file=sys.stderr, flush=True)) if self.rank == 0 \
            else (lambda line: None)
        path = checkpoint.latest_checkpoint(ckpt_dir, warn)
        if path is not None:
            self.step = checkpoint.load(path, self.strategy, self.opt, self.rank)
        return self.step

    def save(self, ckpt_dir: Path) -> None:
        # A peer lost while writing: after a regroup the survivors write the checkpoint again.
        self._until_done(lambda: checkpoint.save(ckpt_dir, self.step, self.strategy, self.opt, self.rank),
                         self.step - 1, True, time.perf_counter())

    # ---- one optimizer step
    def train_step(self, batch: GlobalBatch) -> dict:
        self.timer.reset()
        sync(self.device)
        t0 = time.perf_counter()
        rng = torch.get_rng_state()  # a redone step draws the same dropout masks

        def attempt():
            stats = self.strategy.forward_backward(batch)
            return stats, self.strategy.clip_gradients(self.cfg.train.grad_clip)

        def reset():
            self.opt.zero_grad(set_to_none=True)
            torch.set_rng_state(rng)

        # A lost peer: regroup, then redo the step on the same batch.
        stats, grad_norm = self._until_done(attempt, self.step, False, t0, reset)
        lr = self.cfg.train.lr * self.lr_factor(self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        if not self.memory_at_first_step:
            self.memory_at_first_step = self.memory()  # gradients and AdamW state are live now
        try:
            self.strategy.after_step(self.step, self.opt)
            self.opt.zero_grad(set_to_none=True)
            sync(self.device)
            t_work = time.perf_counter()
            # Idle: how long this rank waits for the slowest one at the end of the step.
            if dist.is_initialized() and dist.get_world_size() > 1:
                wait_works([dist.barrier(group=self.strategy.world_group, async_op=True)], self.cfg.parallel.timeout_s)
        except RuntimeError as e:  # the optimizer step is done on every survivor: keep it (a survivor
            self._recover(e, self.step, True, t0)  # may have passed the barrier: not redone)
            self.opt.zero_grad(set_to_none=True)
            t_work = time.perf_counter()
        t1 = time.perf_counter()
        comm = self.timer.totals()
        step_time = t1 - t0
        idle = t1 - t_work
        row = {
            "step": self.step, "rank": self.rank, "tokens": stats.n_tokens,
            "loss": stats.loss, "lb_loss": stats.lb_loss, "z_loss": stats.z_loss,
            "lr": lr, "grad_norm": grad_norm, "step_time_s": step_time,
            "tokens_per_s": stats.n_tokens / step_time, "dropped_tokens": stats.dropped,
            "compute_s": max(step_time - idle - sum(comm.values()), 0.0), "idle_s": idle,
            "peak_mem_bytes": peak_bytes(self.device)[0],
            **{f"comm_{k}_s": v for k, v in comm.items()},
        }
        self.last_stats = stats
        self.step += 1
        return row

    def _recover(self, error: BaseException, step: int, completed: bool, t0: float) -> None:
        """`ma.failover`: regroup after `error` seen in step `step` (`completed`: after its
        optimizer step), which began at `t0`; without failover (or no peer lost) it propagates."""
        if self.failover is None:
            raise error
        self.failover.recover(error, step, completed, time.perf_counter() - t0)

    def _until_done(self, fn, step: int, completed: bool, t0: float, reset=lambda: None):
        """fn(), called again after each in-job recovery (`reset()` in between)."""
        while True:
            try:
                return fn()
            except (RuntimeError, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
                self._recover(e, step, completed, t0)
                reset()

    def evaluate(self, batches: Iterator[GlobalBatch], n: int) -> tuple[float, float]:
        ce, tokens = 0.0, 0
        for _, batch in zip(range(n), batches):
            c, t = self._until_done(lambda b=batch: self.strategy.evaluate(b), self.step - 1, True, time.perf_counter())
            ce, tokens = ce + c, tokens + t
        loss = ce / max(tokens, 1)
        return loss, math.exp(min(loss, 700.0))

    def memory(self) -> dict:
        return memory_row((p for _, p in self.strategy.named_parameters()), self.opt, self.device)
