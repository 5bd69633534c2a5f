"""Parallel strategies: each distributes the one plain model (masep.model) over a layout."""
from __future__ import annotations

import importlib

# strategy name -> "module:Class"; a strategy is listed only once its parity tests pass.
STRATEGY_CLASSES = {
    "single": "masep.parallel.single:SingleRank",
    "pp": "masep.parallel.pp:PipelineParallel",
    "tp_pp": "masep.parallel.tp_pp:TensorPipelineParallel",
    "tp": "masep.parallel.tp:TensorParallel",
    "ep_dp": "masep.parallel.ep_dp:ExpertDataParallel",
    "ma_sep": "masep.parallel.ma_sep:MASeparation",
}


def available_strategies() -> list[str]:
    return list(STRATEGY_CLASSES)


def build_strategy(cfg, layout, rank, device, model):
    """Instantiate the strategy of `layout` on this rank from the full initialised `model`."""
    from masep.config import ConfigError

    if layout.strategy not in STRATEGY_CLASSES:
        raise ConfigError(f"parallel.strategy: {layout.strategy!r} is not built "
                          f"(available: {', '.join(STRATEGY_CLASSES)})")
    module, cls = STRATEGY_CLASSES[layout.strategy].split(":")
    return getattr(importlib.import_module(module), cls)(cfg, layout, rank, device, model)
