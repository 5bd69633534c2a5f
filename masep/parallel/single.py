"""The reference: the whole model on one rank, micro-batches by gradient accumulation."""
from __future__ import annotations

import time
import warnings

import torch

from masep.model import MoETransformer, lm_loss_sum
from masep.parallel.base import Generation, GlobalBatch, LocalStats, StaticDecoder, Strategy, StepStats, sync


class SingleRank(Strategy):
    name = "single"

    def __init__(self, cfg, layout, rank, device, model: MoETransformer):
        super().__init__(cfg, layout, rank, device)
        self.model = model.to(self.device)
        self._compiled_step, self._compile_failed = None, False

    def modules(self):
        return [self.model]

    def named_parameters(self):
        return list(self.model.named_parameters())

    def forward_backward(self, batch: GlobalBatch) -> StepStats:
        batch = batch.to(self.device)
        n_valid = batch.n_valid()
        mbs = batch.microbatches(self.layout.microbatch_size)
        lb_coef, z_coef = self.aux_coefficients()
        stats = LocalStats(self.cfg.model.layers, self.cfg.model.experts)
        for mb in mbs:
            with self.autocast():
                logits, routings = self.model(mb.inputs)
            ce = lm_loss_sum(logits, mb.targets, mb.mask)
            aux = sum(lb_coef * r.lb_loss + z_coef * r.z_loss for r in routings) / len(mbs)
            (ce / max(n_valid, 1) + aux).backward()
            stats.add_ce(ce)
            for layer, r in enumerate(routings):
                stats.add_routing(layer, r)
        return stats.reduce(n_valid, len(mbs), self.device)

    @torch.no_grad()
    def evaluate(self, batch: GlobalBatch) -> tuple[float, int]:
        batch = batch.to(self.device)
        was_training = self.model.training
        self.model.eval()
        ce = 0.0
        for mb in batch.microbatches(self.layout.microbatch_size):
            with self.autocast():
                logits, _ = self.model(mb.inputs)
            ce += float(lm_loss_sum(logits, mb.targets, mb.mask))
        self.model.train(was_training)
        return ce, batch.n_valid()

    def decode_path(self) -> str:
        infer = self.cfg.infer
        if not (infer.cuda_graph and self.device.type == "cuda"):
            return "fixed-shape step, no CUDA graph"
        compiled = infer.compile != "eager" and not self._compile_failed
        return "fixed-shape step in a CUDA graph" + (f", torch.compile {infer.compile}" if compiled else "")

    def _decoder(self, ids: torch.Tensor, pos: torch.Tensor, caches) -> StaticDecoder:
        infer, model = self.cfg.infer, self.model
        graph = infer.cuda_graph and self.device.type == "cuda"
        if infer.compile != "eager" and graph and not self._compile_failed:
            if self._compiled_step is None:
                mode = "max-autotune-no-cudagraphs" if infer.compile == "max-autotune" else None  # the graph is ours
                self._compiled_step = torch.compile(model.decode_step, fullgraph=True, dynamic=False, mode=mode)
            try:
                return StaticDecoder(lambda i, p: self._compiled_step(i, p, caches), ids, pos, True)
            except Exception as e:  # noqa: BLE001 - e.g. no C compiler for Triton: decode uncompiled
                warnings.warn(f"torch.compile of the decode step failed ({type(e).__name__}: {e}); "
                              "decoding without it")
                self._compile_failed = True
        return StaticDecoder(lambda i, p: model.decode_step(i, p, caches), ids, pos, graph)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> Generation:
        model = self.model
        was_training = model.training
        model.eval()
        prompt = prompt.to(self.device)
        B, T0 = prompt.shape
        # Cache length rounded up: runs of different lengths from one context share one compiled step.
        caches = model.new_caches(B, -(-(T0 + new_tokens) // 64) * 64, dtype=self.compute_dtype())
        sync(self.device)
        t0 = time.perf_counter()
        with self.autocast():
            logits, _ = model(prompt, 0, caches, last_only=True)
        next_ids = logits[:, -1].argmax(-1)
        sync(self.device)
        prefill_s = time.perf_counter() - t0
        # Decoding proper: the fixed-shape step, on a GPU compiled and captured as one CUDA graph.
        with self.autocast():
            decoder = self._decoder(next_ids[:, None], torch.tensor([T0], device=self.device), caches)
        rest, times = self.stream_tokens(decoder, new_tokens - 1)
        model.train(was_training)
        return Generation(torch.stack([next_ids.cpu()] + rest, 1), prefill_s, times)
