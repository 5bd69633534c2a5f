"""The code paths that only run on a GPU, on one GPU: `python -m pytest -m gpu tests/test_gpu.py`.

Skipped without CUDA (CI has no GPU). Each test compares a GPU path with the reference it stands
in for: the grouped expert kernel with the per-expert loop, a bf16 training step with the fp32 CPU
step, the captured (and compiled) decode step with the eager one, `tp` and `ep_dp` on a one-rank
NCCL group with `single`, and NCCL failures (a refused exchange, a collective past its timeout)
as clear errors.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from masep.config import load_config
from masep.model import Experts, build_model
from masep.model import moe_transformer
from masep.parallel.base import GlobalBatch
from masep.parallel.layout import make_layout
from masep.parallel.single import SingleRank

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")
# Widths the grouped kernel takes (multiples of 8), small enough for seconds per test.
SMALL = ["model.hidden=256", "model.heads=4", "model.expert_hidden=512", "model.vocab_size=1000",
         "model.dropout=0.0", "model.expert_dropout=0.0", "model.capacity_factor=null", "data.seq_len=64",
         "train.global_batch=8", "train.micro_batch=4", "train.lr=0.003", "train.warmup_steps=0",
         "train.deterministic=false", "infer.warmup_tokens=2"]
STEPS = 3


def small_cfg(*extra: str):
    return load_config("tiny", SMALL + list(extra))


def batches(cfg, n: int) -> list[GlobalBatch]:
    g = torch.Generator().manual_seed(7)
    G, T, V = cfg.train.global_batch, cfg.data.seq_len, cfg.model.vocab_size
    return [GlobalBatch(torch.randint(0, V, (G, T), generator=g), torch.randint(0, V, (G, T), generator=g),
                        torch.ones(G, T)) for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_grouped_expert_kernel_matches_the_loop(monkeypatch):
    torch.manual_seed(0)
    experts = Experts(16, 256, 512).to(CUDA)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0.0, 0.05)
    counts = torch.tensor([0, 7, 130, 1, 64, 0, 33, 5, 90, 2, 17, 0, 41, 8, 256, 3], device=CUDA)
    x = torch.randn(int(counts.sum()), 256, device=CUDA, dtype=torch.bfloat16)

    def run():
        xi = x.clone().requires_grad_()
        y = experts(xi, counts)
        y.float().square().sum().backward()
        grads = (xi.grad, experts.w_up.grad.clone(), experts.w_down.grad.clone())
        experts.zero_grad(set_to_none=True)
        return y.float(), grads

    assert moe_transformer.use_grouped_mm(x)
    y_grouped, g_grouped = run()
    monkeypatch.setattr(moe_transformer, "use_grouped_mm", lambda x: False)
    y_loop, g_loop = run()
    torch.testing.assert_close(y_grouped, y_loop, rtol=2e-2, atol=1e-3)
    for a, b in zip(g_grouped, g_loop):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


def test_single_bf16_step_matches_fp32_cpu():
    from masep.runtime.trainer import Trainer

    gpu = Trainer(small_cfg(), 0, CUDA)  # dtype auto: bf16 autocast over fp32 weights
    cpu = Trainer(small_cfg(), 0, "cpu")  # fp32
    cpu.strategy.model.load_state_dict({k: v.cpu() for k, v in gpu.strategy.model.state_dict().items()})
    for b in batches(gpu.cfg, STEPS):
        got, want = gpu.train_step(b), cpu.train_step(b)
        # The load-balancing loss is left out: at these widths router logits sit close together
        # and bf16 activations flip many top-2 choices (seen: 1.04 against 1.11).
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-2)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-1)


def test_captured_decode_matches_eager():
    cfg = small_cfg("infer.compile=eager")
    strategy = SingleRank(cfg, make_layout(cfg), 0, CUDA, build_model(cfg.model, 0, CUDA))
    prompt = torch.randint(0, cfg.model.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    cfg.infer.cuda_graph = False
    eager = strategy.generate(prompt, 12).tokens
    cfg.infer.cuda_graph = True
    assert strategy.decode_path() == "fixed-shape step in a CUDA graph"
    assert torch.equal(strategy.generate(prompt, 12).tokens, eager)

    # Compiled kernels round differently from eager ones: the step's logits agree to bf16 precision.
    model = strategy.model.eval()
    with torch.no_grad(), strategy.autocast():
        caches = model.new_caches(2, 64, dtype=torch.bfloat16)
        logits, _ = model(prompt.to(CUDA), 0, caches, last_only=True)
        ids, pos = logits[:, -1].argmax(-1, keepdim=True), torch.tensor([prompt.shape[1]], device=CUDA)
        want = model.decode_logits(ids, pos, caches)
        got = torch.compile(model.decode_logits, fullgraph=True, dynamic=False)(ids, pos, caches)
    finite = want.isfinite()
    torch.testing.assert_close(got[finite], want[finite], rtol=2e-2, atol=2e-2)


@pytest.fixture(scope="module")
def nccl_one_rank():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0),
                            timeout=timedelta(seconds=120))
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("strategy", [["parallel.strategy=tp", "parallel.tp=1"], ["parallel.strategy=ep_dp"]],
                         ids=["tp1", "ep_dp1"])
def test_nccl_one_rank_step_matches_single(nccl_one_rank, strategy):
    from masep.runtime.trainer import Trainer

    data = batches(small_cfg(), STEPS)
    want = [r["loss"] for r in map(Trainer(small_cfg(), 0, CUDA).train_step, data)]
    trainer = Trainer(small_cfg(*strategy), 0, CUDA)  # same seed on the same device: same weights
    assert trainer.strategy.name != "single"
    got = [trainer.train_step(b)["loss"] for b in data]
    assert got == pytest.approx(want, rel=1e-2)


FAILED_EXCHANGE = """
import os, torch, torch.distributed as dist
from datetime import timedelta
from masep.parallel.comm import PeerCommError, p2p_exchange
dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0),
                        timeout=timedelta(seconds=60))
try:
    p2p_exchange([], [(torch.empty(4, device="cuda"), 0)], timeout_s=2.0)  # nobody sends
    print("returned without error", flush=True)
except PeerCommError as e:
    print(e, flush=True)
os._exit(0)  # a failed communicator would hold up an orderly shutdown
"""


# A collective queued behind ~11 s of device work in a group whose timeout is 2 s (`_sleep` takes
# at most 2**31 - 1 cycles, ~1.1 s on an H200); the host then idles, so only the watchdog can act.
STUCK_COLLECTIVE = """
import time, torch, torch.distributed as dist
from datetime import timedelta
from masep.parallel.comm import new_group_containing
dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
group = new_group_containing(0, [[0]], timeout=timedelta(seconds=2))
t = torch.ones(1, device="cuda")
for _ in range(10):
    torch.cuda._sleep(2**31 - 1)
dist.all_reduce(t, group=group)
time.sleep(20)
"""

def run_one_rank(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
           "WORLD_SIZE": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    print(res.returncode, res.stdout, res.stderr[:3000])
    return res


def test_nccl_failed_exchange_is_a_clear_error():
    """One GPU cannot host a silent peer (NCCL refuses two ranks on one device), and a receive
    from oneself with no matching send is refused at once; it must surface as the error that
    names the rank and the exchange."""
    res = run_one_rank(FAILED_EXCHANGE)
    assert "rank 0: point-to-point exchange with rank(s) [0] failed" in res.stdout


def test_nccl_collective_past_its_timeout_is_named_and_ends_the_process():
    """A collective that outlives its group's timeout (`parallel.timeout_s` in the strategies):
    NCCL's watchdog names the operation and the timeout, and the process ends abnormally."""
    res = run_one_rank(STUCK_COLLECTIVE)
    assert res.returncode != 0
    assert "Watchdog caught collective operation timeout" in res.stderr
    assert "OpType=ALLREDUCE" in res.stderr and "Timeout(ms)=2000" in res.stderr
