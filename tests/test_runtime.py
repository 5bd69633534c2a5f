import math

import pytest
import torch

from masep.config import load_config
from masep.parallel.base import GlobalBatch
from masep.runtime.trainer import Trainer, lr_lambda

SETS = ["data.seq_len=32", "train.global_batch=4", "train.micro_batch=2", "train.steps=6",
        "train.warmup_steps=2", "train.decay_steps=6", "model.hidden=32", "model.heads=2",
        "model.expert_hidden=32"]


def batch_for(step: int, cfg) -> GlobalBatch:
    """Batches are a function of the step, as the real reader's are."""
    g = torch.Generator().manual_seed(1000 + step)
    T, G = cfg.data.seq_len, cfg.train.global_batch
    x = torch.randint(0, 200, (G, T + 1), generator=g)
    mask = torch.ones(G, T)
    mask[0, T // 2:] = 0  # a padded tail, as the padding reader produces
    return GlobalBatch(x[:, :-1], x[:, 1:], mask)


def test_lr_warmup_then_cosine_to_floor():
    cfg = load_config("tiny", ["train.warmup_steps=10", "train.decay_steps=110", "train.min_lr_ratio=0.1"])
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_training_reduces_loss_on_a_repeated_batch():
    cfg = load_config("tiny", SETS + ["train.lr=0.01", "train.steps=30", "train.warmup_steps=0",
                                      "train.decay_steps=30"])
    tr = Trainer(cfg)
    b = batch_for(0, cfg)
    first = tr.train_step(b)
    for _ in range(25):
        last = tr.train_step(b)
    assert first["loss"] == pytest.approx(math.log(cfg.model.vocab_size), rel=0.02)  # near uniform at init
    assert last["loss"] < first["loss"] * 0.6
    assert first["tokens"] == int(b.mask.sum())
    assert first["lb_loss"] > 0.9 and first["z_loss"] > 0


def test_resume_gives_exactly_the_uninterrupted_losses(tmp_path):
    # expert dropout on: the checkpointed RNG state must carry the dropout stream too
    cfg = load_config("tiny", SETS + ["model.expert_dropout=0.1"])
    straight = Trainer(cfg)
    want = [straight.train_step(batch_for(s, cfg))["loss"] for s in range(6)]

    first = Trainer(cfg)
    got = [first.train_step(batch_for(s, cfg))["loss"] for s in range(3)]
    first.save(tmp_path / "ckpt")
    del first
    resumed = Trainer(cfg)
    assert resumed.resume(tmp_path / "ckpt") == 3
    got += [resumed.train_step(batch_for(s, cfg))["loss"] for s in range(3, 6)]
    assert got == want  # bit-identical


def test_step_rows_account_for_the_step_time():
    cfg = load_config("tiny", SETS)
    row = Trainer(cfg).train_step(batch_for(0, cfg))
    parts = row["compute_s"] + row["idle_s"] + sum(v for k, v in row.items() if k.startswith("comm_"))
    assert parts == pytest.approx(row["step_time_s"], rel=1e-6)
    assert row["comm_grad_sync_s"] == 0.0  # one rank: nothing to synchronise
    assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["step_time_s"])


@pytest.mark.parametrize("damage", ["truncate", "delete_metadata"])
def test_a_damaged_checkpoint_fails_with_its_path_and_is_left_in_place(tmp_path, damage):
    """Resuming from a checkpoint that cannot be read raises an ordinary error (DCP's own is a
    BaseException, which a job launcher reports as a crash without a message) naming the
    folder; nothing is deleted."""
    from masep.runtime.checkpoint import CheckpointError

    cfg = load_config("tiny", SETS)
    tr = Trainer(cfg)
    tr.train_step(batch_for(0, cfg))
    tr.save(tmp_path / "ckpt")
    folder = tmp_path / "ckpt" / "step-1"
    if damage == "truncate":
        for f in folder.glob("*.distcp"):
            f.write_bytes(f.read_bytes()[:100])
    else:
        (folder / ".metadata").unlink()
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(CheckpointError, match="step-1"):
        Trainer(cfg).resume(tmp_path / "ckpt")
    assert sorted(p.name for p in folder.iterdir()) == before


def test_fused_adamw_steps_refresh_the_bf16_weight_copies():
    """The fused AdamW kernel (the GPU default) updates weights without bumping their versions;
    unless `make_optimizer` bumps them, bf16 training keeps computing with the first weights."""
    from masep.runtime.trainer import make_optimizer

    overrides = ["model.expert_dropout=0.0", "model.capacity_factor=null", "data.seq_len=32"]
    bf16, fp32 = Trainer(load_config("tiny", overrides + ["train.dtype=bf16"])), Trainer(load_config("tiny", overrides))
    bf16.opt = make_optimizer(bf16.strategy, bf16.cfg, fused=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randint(0, bf16.cfg.model.vocab_size, (8, 33), generator=gen)
        batch = GlobalBatch(x[:, :-1], x[:, 1:], torch.ones(8, 32))
        assert bf16.train_step(batch)["grad_norm"] == pytest.approx(fp32.train_step(batch)["grad_norm"], rel=0.05)


@pytest.mark.parametrize("other_step", [True, False])
def test_latest_naming_a_missing_step_resumes_from_the_newest_one_beside_it(tmp_path, capsys, other_step):
    """`latest` naming a folder that is gone never restarts silently: it resumes from the newest
    step-N/ beside it, or says that there is none."""
    cfg = load_config("tiny", SETS)
    tr = Trainer(cfg)
    tr.train_step(batch_for(0, cfg))
    tr.save(tmp_path / "ckpt")
    if not other_step:
        import shutil
        shutil.rmtree(tmp_path / "ckpt" / "step-1")
    (tmp_path / "ckpt" / "latest").write_text("step-30\n")
    assert Trainer(cfg).resume(tmp_path / "ckpt") == (1 if other_step else 0)
    line = capsys.readouterr().err.strip()
    assert line == (f"masep train: {tmp_path / 'ckpt' / 'latest'} names step-30, which is missing; "
                    + ("resuming from step-1, the newest checkpoint beside it" if other_step
                       else "no other checkpoint is there, so training starts at step 0"))
