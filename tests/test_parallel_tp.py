"""Strategy `tp` beyond parity (test_parallel_parity.py): replicated dropout, the trainer with a
checkpoint, and the shards. Rank functions live at module level so spawned ranks can import them."""
from __future__ import annotations

import pytest
import torch

from masep.model import build_model
from masep.parallel.sharding import is_tp_sharded, tp_shard
from masep.testing import run_ranks
from parity import CAPACITY, DROPLESS, build, check_trainer_run, make_batches, make_cfg, trainer_run

DROPOUT = ["parallel.strategy=tp", "parallel.tp=4", "model.dropout=0.2", "model.expert_dropout=0.2"] + DROPLESS
TRAINER = ["parallel.strategy=tp", "parallel.tp=2", "model.dropout=0.1", "model.expert_dropout=0.1"] + CAPACITY


def tp_rank(rank: int, world: int, ckpt_dir: str) -> dict:
    """One training step with dropout on (the replicated parameters' gradients), and the trainer."""
    cfg = make_cfg(DROPOUT, world)
    strategy = build(cfg, rank)
    strategy.train(True)
    strategy.forward_backward(make_batches(cfg, 1)[0])
    grads = {n: p.grad.clone() for n, p in strategy.named_parameters() if not is_tp_sharded(n)}
    return {"dropout": grads, "trainer": trainer_run(rank, world, TRAINER, ckpt_dir)}


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return run_ranks(4, tp_rank, str(tmp_path_factory.mktemp("tp-checkpoints")), timeout_s=120)


def test_tp_ranks_draw_identical_replicated_dropout(world4):
    """Ranks start from different RNG streams (as the trainer seeds them) and experts drop out
    on their own rows; the residual dropout after them must still agree across the group, or
    the replicated parameters' gradients would differ from rank to rank."""
    grads = [r["dropout"] for r in world4]
    assert {"head.weight", "embed.weight", "blocks.1.moe.router.weight"} <= set(grads[0])
    for other in grads[1:]:
        for name, g in grads[0].items():
            assert torch.equal(other[name], g), name
    assert grads[0]["head.weight"].abs().sum() > 0


def test_tp_under_the_trainer_resumes_exactly(world4):
    check_trainer_run([r["trainer"] for r in world4], {"attn_allreduce", "moe_dispatch", "grad_sync"})


def test_tp_shards_cover_each_parameter_exactly_once():
    cfg = make_cfg(["parallel.strategy=tp", "parallel.tp=2"], 4)
    for name, p in build_model(cfg.model, 0).named_parameters():
        ids = torch.arange(p.numel(), dtype=torch.float64).view(p.shape)
        if is_tp_sharded(name):
            parts = [tp_shard(name, ids, cfg.model, r, 2) for r in range(2)]
            assert all(x.numel() == p.numel() // 2 for x in parts), name
            assert torch.equal(torch.cat([x.reshape(-1) for x in parts]).sort().values, ids.reshape(-1)), name
        else:
            assert tp_shard(name, ids, cfg.model, 1, 2) is ids
