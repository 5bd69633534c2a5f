"""The reference: the whole model on one rank, micro-batches by gradient accumulation."""
from __future__ import annotations

import warnings

import torch

from masep.model import MoETransformer
from masep.parallel.base import StaticDecoder, Strategy


class SingleRank(Strategy):
    name = "single"

    def __init__(self, cfg, layout, rank, device, model: MoETransformer):
        super().__init__(cfg, layout, rank, device)
        self.model = model.to(self.device)
        self._compiled_step, self._compile_failed = None, False

    def modules(self):
        return [self.model]

    def forward(self, mb):
        return self.model(mb.inputs, mask=mb.mask)

    def new_caches(self, batch, max_len):
        # Rounded up: runs of different lengths from one context share one compiled step.
        return self.model.new_caches(batch, -(-max_len // 64) * 64, dtype=self.compute_dtype())

    def prefill(self, ids, caches):
        return self.model(ids, 0, caches, last_only=True)[0][:, -1].argmax(-1)

    def decode_step(self, ids, pos, caches):
        return self.model.decode_step(ids, pos, caches)

    def cuda_graph(self) -> bool:
        return self.cfg.infer.cuda_graph and self.device.type == "cuda"

    def _compiles(self) -> bool:
        return self.cfg.infer.compile != "eager" and self.cuda_graph() and not self._compile_failed

    def decode_path(self) -> str:
        if not self.cuda_graph():
            return "fixed-shape step, no CUDA graph"
        return "fixed-shape step in a CUDA graph" + (f", torch.compile {self.cfg.infer.compile}"
                                                     if self._compiles() else "")

    def decoder(self, ids, pos, caches) -> StaticDecoder:
        """On a GPU the step is compiled and captured as one CUDA graph."""
        if self._compiles():
            if self._compiled_step is None:
                mode = "max-autotune-no-cudagraphs" if self.cfg.infer.compile == "max-autotune" else None  # the graph is ours
                self._compiled_step = torch.compile(self.model.decode_step, fullgraph=True, dynamic=False, mode=mode)
            try:
                return StaticDecoder(lambda i, p: self._compiled_step(i, p, caches), ids, pos, True)
            except Exception as e:  # noqa: BLE001 - e.g. no C compiler for Triton: decode uncompiled
                warnings.warn(f"torch.compile of the decode step failed ({type(e).__name__}: {e}); "
                              "decoding without it")
                self._compile_failed = True
        return super().decoder(ids, pos, caches)
