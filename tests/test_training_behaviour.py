"""What a user sees of training: gradient clipping in the parameter update, and a `masep train`
run killed after a checkpoint and started again, step by step against an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from masep.config import load_config
from masep.parallel.base import GlobalBatch
from masep.runtime.trainer import Trainer

SETS = ["data.seq_len=32", "train.global_batch=4", "train.micro_batch=2", "model.hidden=32", "model.heads=2",
        "model.layers=2", "model.experts=4", "model.expert_hidden=32", "train.warmup_steps=0",
        "train.weight_decay=0", "train.lr=0.001"]


def _max_update(grad_clip) -> tuple[float, float]:
    """(largest |change| of any weight in the first step, the gradient norm the step reports)."""
    cfg = load_config("tiny", SETS + [f"train.grad_clip={grad_clip}"])
    trainer = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.strategy.named_parameters()}
    x = torch.randint(0, 200, (4, 33), generator=torch.Generator().manual_seed(0))
    row = trainer.train_step(GlobalBatch(x[:, :-1], x[:, 1:], torch.ones(4, 32)))
    change = max(float((p.detach() - before[n]).abs().max()) for n, p in trainer.strategy.named_parameters())
    return change, row["grad_norm"]


def test_clipping_shrinks_the_parameter_update():
    # AdamW's first step moves each weight by lr * g / (|g| + 1e-8): about lr for an ordinary
    # gradient, but at most lr / 100 once the whole gradient is clipped to a norm of 1e-10.
    lr = 0.001
    free, norm = _max_update(0.0)  # 0: no clipping
    clipped, clipped_norm = _max_update("1.0e-10")
    assert free > 0.5 * lr
    assert clipped < 0.02 * lr
    assert clipped_norm == pytest.approx(norm, rel=1e-5) and norm > 1e-3  # the norm before clipping


# ------------------------------------------------------------------ kill, re-run, compare

RUN_SETS = SETS + ["train.steps=12", "train.decay_steps=12", "train.checkpoint_every=3", "train.eval_every=100",
                   "train.eval_batches=1", "train.log_every=1", "model.expert_dropout=0.1"]


def _train(tmp: Path, sets: list[str], out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "masep.cli", "train", "--strategy", "single", "--set", *sets, "--out", str(out)]
    # A session of its own: the kill reaches the launcher and the rank process it started.
    # TMPDIR: the rank fork server killed with it leaves its socket folder there, not in /tmp.
    return subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "TMPDIR": str(tmp)})


def _finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]


def _steps(out: Path) -> list[dict]:
    return sorted(pq.read_table(out / "steps-rank0.parquet").to_pylist(), key=lambda r: r["step"])


@pytest.mark.slow  # three `masep train` processes (each starts a rank process): about a minute
def test_masep_train_killed_after_a_checkpoint_resumes_with_the_same_data_and_losses(tmp_path):
    from masep.data import tokenize as tok
    from masep.data.batches import TokenDataset
    from masep.data.shards import shard_dirs
    from masep.data.c4 import shard_name
    from masep.runtime.checkpoint import latest_checkpoint
    from masep.runtime.worker import batch_crc32
    from helpers import write_c4

    write_c4(tmp_path / "c4" / shard_name(0))
    sets = RUN_SETS + ["data.source=local", f"data.local_dir={tmp_path / 'c4'}",
                       f"data.tokens_dir={tmp_path / 'tokens'}", f"launch.log_dir={tmp_path / 'logs'}"]
    cfg = load_config("tiny", sets)
    tok.tokenize_shard(cfg.data, 0)

    straight = _train(tmp_path, sets, tmp_path / "straight")
    _finish(straight)

    resumed = tmp_path / "resumed"
    proc = _train(tmp_path, sets, resumed)
    deadline = time.monotonic() + 600
    while latest_checkpoint(resumed / "checkpoint") is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not (resumed / "run.json").exists(), "the run finished before it could be killed: give it more steps"
    _finish(_train(tmp_path, sets, resumed))

    want, got = _steps(tmp_path / "straight"), _steps(resumed)
    assert [r["step"] for r in got] == list(range(12))  # rows after the checkpoint were dropped, none repeated
    train = TokenDataset(shard_dirs(cfg), "train", cfg.data.seq_len, cfg.data.packing)
    loader = [batch_crc32(train.batch(s, cfg.train.global_batch, cfg.train.seed)) for s in range(12)]
    assert [r["batch_crc32"] for r in want] == loader  # each step saw the batch of its (seed, step)
    assert [r["batch_crc32"] for r in got] == loader
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-6)
    assert 0 < json.loads((resumed / "run.json").read_text())["resumed_from_step"] < 12
