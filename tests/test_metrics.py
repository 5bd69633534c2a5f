"""Metrics: telemetry (NVML / RAPL), energy windows, MFU, and the paper-shaped DuckDB views.

Real runs (one training run through the worker, a 2-rank gloo run with an injected delay)
check what is measured end to end; run folders written here with pyarrow check the views'
arithmetic against numbers computed by hand. Those numbers only ever live in tmp_path.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from masep.config import load_config
from masep.model import build_model
from masep.results.collect import collect
from masep.telemetry.energy import MIN_WINDOW_S, Rapl, interpolate, segment_windows, warmup_steps
from masep.telemetry.flops import H200_DENSE_BF16, train_flops_per_token
from masep.telemetry.mfu import flops_record, group_train_flops_per_token
from masep.telemetry.nvml import NvmlGpu, TelemetrySampler
from helpers import GPU, SMALL, SMALL_VOCAB, query, train_steps, windows, write_c4, write_run_from_rows


# ------------------------------------------------------------------ MFU


def test_flop_formula_matches_hand_computation_for_the_paper_preset():
    cfg = load_config("paper", ["parallel.strategy=ma_sep", "parallel.world_size=16", "parallel.attn_tp=4",
                                "parallel.attn_replicas=2", "parallel.moe_ranks=8"])
    # active matmul parameters: attention 4 x 4 x 4096^2, top-2 SwiGLU experts 4 x 2 x 3 x 4096 x 16384,
    # routers 4 x 4096 x 16, head 50304 x 4096 = 2,085,355,520
    want = 3 * (2 * 2_085_355_520 + 4 * 4 * 2048 * 4096 / 2)
    assert train_flops_per_token(cfg.model, 2048) == want == 12_713_459_712
    groups = group_train_flops_per_token(cfg.model, 2048)
    assert groups["moe"] == 3 * 2 * 4 * 2 * 3 * 4096 * 16384
    assert groups["attention"] == 3 * (2 * (4 * 4 * 4096**2 + 4 * 4096 * 16 + 50304 * 4096) + 4 * 4 * 2048 * 4096 / 2)
    assert groups["attention"] + groups["moe"] == want
    rec = flops_record(cfg, "cpu")
    assert (rec["gpus"], rec["attention_group_gpus"], rec["moe_group_gpus"]) == (16, 8, 8)
    assert rec["peak_flops_per_gpu"] is None and rec["peak_reason"] == "no GPU peak for CPU"
    # the paper's 13,289 tokens/s per GPU on A100s (312 TFLOP/s) is ~54% MFU by this formula
    assert 13289 * want / 312e12 == pytest.approx(0.5415, abs=1e-4)


# ------------------------------------------------------------------ RAPL, NVML, sampler


def fake_rapl(root: Path, zones: dict[str, tuple[str, int, int]]) -> Path:
    """A powercap tree: zone -> (name, energy_uj, max_energy_range_uj)."""
    for zone, (name, energy, max_range) in zones.items():
        d = root / zone
        d.mkdir(parents=True, exist_ok=True)
        (d / "name").write_text(name + "\n")
        (d / "energy_uj").write_text(f"{energy}\n")
        (d / "max_energy_range_uj").write_text(f"{max_range}\n")
    return root


def set_energy(root: Path, zone: str, uj: int) -> None:
    tmp = root / zone / ".energy_uj.tmp"  # replaced whole, as sysfs reads never see half a number
    tmp.write_text(f"{uj}\n")
    tmp.replace(root / zone / "energy_uj")


def test_rapl_sums_packages_and_handles_wrap_around(tmp_path):
    root = fake_rapl(tmp_path / "powercap", {
        "intel-rapl:0": ("package-0", 1_000_000, 2_000_000),
        "intel-rapl:0:0": ("core", 500_000, 2_000_000),  # part of package 0: not added again
        "intel-rapl:1": ("package-1", 10_000, 2_000_000),
        "intel-rapl:2": ("psys", 7_000_000, 9_000_000),  # the platform covers the packages
    })
    (root / "intel-rapl").mkdir()  # the control-type folder has no zone number
    rapl = Rapl(root)
    assert rapl.reason is None and rapl.read_j() == 0.0
    set_energy(root, "intel-rapl:0", 1_500_000)
    set_energy(root, "intel-rapl:0:0", 1_900_000)
    set_energy(root, "intel-rapl:1", 260_000)
    set_energy(root, "intel-rapl:2", 8_000_000)
    assert rapl.read_j() == pytest.approx(0.75)
    set_energy(root, "intel-rapl:0", 100_000)  # wrapped at 2 J: 0.5 J to the top, 0.1 J after
    assert rapl.read_j() == pytest.approx(0.75 + 0.6)


def test_rapl_missing_or_unreadable_is_none_with_reason(tmp_path):
    rapl = Rapl(tmp_path / "nowhere")
    assert rapl.read_j() is None and rapl.reason.startswith("no RAPL:")
    root = fake_rapl(tmp_path / "powercap", {"intel-rapl:0": ("package-0", 1, 10)})
    (root / "intel-rapl:0" / "energy_uj").unlink()
    (root / "intel-rapl:0" / "energy_uj").mkdir()  # reads fail as they do without permission
    rapl = Rapl(root)
    assert rapl.read_j() is None and rapl.reason.startswith("RAPL unreadable:")
    assert Rapl(fake_rapl(tmp_path / "empty", {})).reason.startswith("no RAPL:")


def test_energy_columns_are_null_with_reason_without_nvml(tmp_path):
    assert NvmlGpu("cpu").reason == NvmlGpu("cpu").energy_reason == "no GPU"
    try:
        import pynvml

        pynvml.nvmlInit()
        pytest.skip("NVML works on this machine")
    except Exception:  # noqa: BLE001 - the case under test
        pass
    gpu = NvmlGpu(torch.device("cuda", 0))
    assert gpu.handle is None and gpu.reason.startswith("NVML unavailable: ") and gpu.read() == {}
    sampler = TelemetrySampler("r", 0, torch.device("cuda", 0), rapl=Rapl(tmp_path / "nowhere")).start()
    assert sampler._thread is None  # nothing to sample: no thread, a row at start and at stop
    sampler.stop()
    rows = sampler.rows()
    assert len(rows) == 2
    for row in rows:
        assert [row[k] for k in ("gpu_util", "mem_util", "power_w", "energy_mj", "mem_used_bytes", "cpu_energy_j")] \
            == [None] * 6
        assert row["energy_reason"].startswith("NVML unavailable: ") and row["cpu_energy_reason"].startswith("no RAPL")


def test_sampler_thread_samples_rapl_until_stopped(tmp_path):
    root = fake_rapl(tmp_path / "powercap", {"intel-rapl:0": ("package-0", 0, 10**9)})
    sampler = TelemetrySampler("r", 3, "cpu", interval_s=0.005, rapl=Rapl(root)).start()
    for uj in range(100_000, 1_100_000, 100_000):  # 0.1 J every few ms
        time.sleep(0.01)
        set_energy(root, "intel-rapl:0", uj)
    sampler.stop()
    rows = sampler.rows()
    assert sampler.error is None and len(rows) > 2 and {r["rank"] for r in rows} == {3}  # > start and stop
    energy = [r["cpu_energy_j"] for r in rows]
    assert energy == sorted(energy) and energy[0] == 0.0 and energy[-1] == pytest.approx(1.0)
    assert all(r["gpu_reason"] == "no GPU" for r in rows)
    assert [r["t_s"] for r in rows] == sorted(r["t_s"] for r in rows)
    n = len(rows)
    sampler.stop()  # idempotent
    assert len(sampler.rows()) == n


# ------------------------------------------------------------------ energy windows


def samples_at(times, watts: float, seg: float, rank: int = 0, gpu_util: float = 50.0) -> list[dict]:
    """GPU samples of a constant power draw: the energy counter (mJ) rises by watts per second."""
    return [{"run_id": "r", "rank": rank, "host": "h", "segment_start_s": seg, "t_s": t,
             "gpu_util": gpu_util, "mem_util": 20.0, "power_w": watts, "energy_mj": int(1e6 + watts * 1e3 * (t - 1000)),
             "mem_used_bytes": 1, "cpu_energy_j": None, "gpu_reason": None, "energy_reason": None,
             "cpu_energy_reason": "no RAPL: test"} for t in times]


def step_rows(first: int, n: int, t0: float, dt: float, tokens: int = 100) -> list[dict]:
    return [{"step": s, "tokens": tokens, "step_time_s": dt, "t_end_unix_s": t0 + (s - first + 1) * dt}
            for s in range(first, first + n)]


def test_interpolation_and_warmup():
    assert interpolate([0.0, 1.0, 2.0], [0.0, None, 4.0], 1.5) == 3.0
    assert interpolate([0.0, 1.0], [0.0, 2.0], 1.0) == 2.0
    assert interpolate([0.0, 1.0], [0.0, 2.0], 1.5) is None
    assert [warmup_steps(n) for n in (1, 10, 11, 200)] == [1, 1, 2, 20]


def test_steady_window_energy_per_segment_of_a_resumed_run():
    # attempt 1 from t=1000: steps 0-9 of 0.5 s; the run resumes at step 6 (rows of 6-9 were
    # dropped), attempt 2 from t=2000 on another GPU drawing 300 W: steps 6-19 of 0.25 s, its
    # own warm-up 6-7
    seg1 = samples_at([1000 + 0.1 * i for i in range(60)], 200.0, 1000.0)
    seg2 = samples_at([2000 + 0.1 * i for i in range(40)], 300.0, 2000.0, gpu_util=90.0)
    steps = step_rows(0, 6, 1000.05, 0.5) + step_rows(6, 14, 2000.05, 0.25)
    w1, w2 = segment_windows(seg1 + seg2, steps, total_steps=20)
    assert w1["warmup_steps"] == w2["warmup_steps"] == 2
    assert (w1["first_step"], w1["last_step"], w1["steps"], w1["tokens"]) == (2, 5, 4, 400)
    assert w1["window_s"] == pytest.approx(2.0) and w1["gpu_energy_j"] == pytest.approx(400.0, abs=1e-3)
    assert (w2["first_step"], w2["last_step"], w2["tokens"]) == (8, 19, 1200)
    assert w2["window_s"] == pytest.approx(3.0) and w2["gpu_energy_j"] == pytest.approx(900.0, abs=1e-3)
    assert w2["gpu_util_mean"] == 90.0 and w2["power_mean_w"] == 300.0 and w2["samples"] == 30
    assert w1["cpu_energy_j"] is None and w1["cpu_energy_reason"] == "no RAPL: test"


@pytest.mark.parametrize("sampled", [False, True], ids=["nothing-to-sample", "rapl-thread"])
def test_a_killed_attempt_keeps_the_window_of_the_steps_it_ran(tmp_path, monkeypatch, sampled):
    """Attempt 1 runs steps 0-9, writes its rows at the checkpoint after step 9 and is killed (no
    stop); attempt 2 resumes at step 10. Each window covers the steps its attempt ran after its
    own warm-up (2 of 20 steps): 2-9 and 12-19."""
    from masep.telemetry import nvml
    from masep.telemetry.writer import read_parquet_rows

    root = fake_rapl(tmp_path / "powercap", {"intel-rapl:0": ("package-0", 0, 10**9)}) if sampled \
        else tmp_path / "nowhere"
    monkeypatch.setattr(nvml, "Rapl", lambda: Rapl(root))
    rows: list[dict] = []

    def run(first: int, last: int) -> None:
        for step in range(first, last):
            t0 = time.time()
            time.sleep(0.01)
            rows.append({"step": step, "tokens": 100, "step_time_s": time.time() - t0, "t_end_unix_s": time.time()})

    killed = nvml.RunTelemetry(tmp_path, "r", 0, "cpu", total_steps=20, interval_s=0.005)
    run(0, 10)
    killed.write(rows)  # the checkpoint's flush; then the process is killed
    killed.sampler._stop.set()  # (only ends this test's sampling thread: a killed process takes no last sample)
    time.sleep(0.02)
    resumed = nvml.RunTelemetry(tmp_path, "r", 0, "cpu", total_steps=20, interval_s=0.005)
    run(10, 20)
    resumed.stop()
    resumed.write(rows)
    w1, w2 = read_parquet_rows(tmp_path / "energy_window-rank0.parquet")
    assert (w1["first_step"], w1["last_step"], w1["steps"], w1["tokens"]) == (2, 9, 8, 800)
    assert (w2["first_step"], w2["last_step"], w2["steps"], w2["tokens"]) == (12, 19, 8, 800)
    for w in (w1, w2):
        assert w["window_s"] > 0 and "warm-up" not in (w["energy_reason"] or "") + (w["cpu_energy_reason"] or "")


def test_a_failed_read_inside_the_window_is_stepped_over():
    samples = samples_at([1000 + 0.1 * i for i in range(40)], 100.0, 1000.0)
    for s in samples[10:12]:
        s.update(gpu_util=None, mem_util=None, power_w=None, energy_mj=None, mem_used_bytes=None,
                 gpu_reason="NVML read failed: test", energy_reason="NVML read failed: test")
    (w,) = segment_windows(samples, step_rows(0, 10, 1000.05, 0.3), total_steps=10)
    assert w["gpu_energy_j"] == pytest.approx(100.0 * 2.7, abs=1e-3) and w["energy_reason"] is None
    assert w["gpu_util_mean"] == 50.0 and w["gpu_reason"] is None


def test_short_or_warmup_only_windows_are_null_with_reason():
    samples = samples_at([1000 + 0.1 * i for i in range(10)], 100.0, 1000.0)
    (short,) = segment_windows(samples, step_rows(0, 4, 1000.0, 0.2), total_steps=4)
    assert short["steps"] == 3 and short["gpu_energy_j"] is None
    assert short["energy_reason"].startswith("steady window 0.60 s < %g s" % MIN_WINDOW_S)
    (warm,) = segment_windows(samples, step_rows(0, 1, 1000.0, 0.2), total_steps=1)
    assert warm["steps"] == 0 and warm["energy_reason"] == "no steady-state step (warm-up only)"
    (unsampled,) = segment_windows(samples[:2], step_rows(0, 4, 1000.0, 0.2), total_steps=4)
    assert unsampled["steps"] == 0 and unsampled["energy_reason"] == "no telemetry sample after its steady steps"


# ------------------------------------------------------------------ a real training run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One single-rank training run through the worker (6 steps), collected."""
    from masep.data import tokenize as tok
    from masep.data.c4 import shard_name
    from masep.runtime.distributed import DistInfo
    from masep.runtime.worker import train_rank

    tmp = tmp_path_factory.mktemp("trained")
    write_c4(tmp / "c4" / shard_name(0))
    cfg = load_config("tiny", SMALL + ["data.source=local", f"data.local_dir={tmp / 'c4'}",
                                       f"data.tokens_dir={tmp / 'tokens'}", "train.steps=6", "train.eval_every=3",
                                       "train.eval_batches=1", "train.checkpoint_every=3"])
    tok.tokenize_shard(cfg.data, 0)
    out = tmp / "runs" / "train" / "single" / "seed=0"
    threads = torch.get_num_threads()
    try:
        train_rank(cfg, out, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    finally:
        torch.set_num_threads(threads)
    db = tmp / "masep.duckdb"
    counts = collect(tmp / "runs", db)
    return out, db, counts


def test_training_run_writes_telemetry_windows_and_flops(trained):
    out, db, counts = trained
    assert counts["steps"] == 6 and counts["memory"] == 1 and counts["energy_window"] == 1
    assert counts["telemetry"] >= 2
    run = json.loads((out / "run.json").read_text())
    assert run["flops"]["train_flops_per_token"] == train_flops_per_token(load_config("tiny", SMALL).model, 32)
    # steady window: steps 1-5 (warm-up is ceil(10%) = 1 step), from telemetry taken by the run itself
    ((first, last, steps, tokens, gpu_energy, reason, window_s),) = query(
        db, "SELECT first_step, last_step, steps, tokens, gpu_energy_j, energy_reason, window_s FROM energy_window")
    assert (first, last, steps) == (1, 5, 5) and gpu_energy is None
    assert tokens == query(db, "SELECT sum(tokens) FROM steps WHERE step >= 1")[0][0]
    step_time = query(db, "SELECT sum(step_time_s) FROM steps WHERE step >= 1")[0][0]
    wall = query(db, "SELECT epoch(ended_at) - epoch(started_at) FROM runs")[0][0]
    assert step_time <= window_s <= wall + 1  # the window also holds evaluation and checkpoints


def test_energy_and_utilisation_are_null_with_reason_on_cpu(trained):
    _, db, _ = trained
    got = dict(((m, (v, r)) for m, v, r in query(
        db, "SELECT metric, measured, reason FROM energy WHERE strategy = 'single'")))
    assert got["energy_per_token_mj"] == (None, "no GPU")
    assert got["gpu_power_w"] == (None, "no GPU")
    assert got["cpu_energy_per_token_mj"][0] is None and got["cpu_energy_per_token_mj"][1]
    assert got["energy_window_s"][0] > 0
    rows = query(db, "SELECT metric, measured, reason FROM table1_performance WHERE strategy = 'single' "
                     "AND metric IN ('gpu_util_pct', 'mem_util_pct', 'mfu_pct') ORDER BY metric")
    assert rows == [("gpu_util_pct", None, "no GPU"), ("mem_util_pct", None, "no GPU"),
                    ("mfu_pct", None, "no GPU peak for CPU")]
    assert query(db, "SELECT count(*) FROM telemetry WHERE gpu_util IS NOT NULL OR energy_mj IS NOT NULL") == [(0,)]


def test_training_run_fills_the_views_it_can_on_cpu(trained):
    _, db, _ = trained
    tps, thr = query(db, "SELECT max(measured) FILTER (WHERE metric = 'tps_per_gpu'), "
                         "max(measured) FILTER (WHERE metric = 'throughput_tok_s') "
                         "FROM table1_performance WHERE strategy = 'single'")[0]
    want = query(db, "SELECT sum(tokens) / sum(step_time_s) FROM steps WHERE step >= 1")[0][0]
    assert tps == thr == pytest.approx(want)
    # beside the paper's claims for the strategies it reports
    assert ("tps_per_gpu", "ma_sep", 13289.0, None) in query(
        db, "SELECT metric, strategy, paper_claim, measured FROM table1_performance")
    comm = dict(query(db, "SELECT metric, measured FROM table2_communication WHERE strategy = 'single'"))
    assert comm["comm_total_pct"] == 0.0 and 99 < comm["compute_pct"] <= 100
    losses = query(db, "SELECT step, train_loss, val_loss FROM convergence WHERE strategy = 'single' ORDER BY step")
    assert [s for s, _, _ in losses] == list(range(6))
    assert losses[0][1] == pytest.approx(math.log(50257), rel=0.05) and losses[2][2] is not None
    assert query(db, "SELECT count(*) FROM load_balance WHERE strategy = 'single' AND measured IS NULL "
                     "AND reason IS NULL") == [(0,)]


def test_expert_shares_sum_to_one_per_run_and_layer(trained):
    _, db, _ = trained
    sums = query(db, "SELECT run_id, layer, sum(share), count(*) FROM expert_shares GROUP BY ALL ORDER BY layer")
    assert [(layer, n) for _, layer, _, n in sums] == [(0, 8), (1, 8)]
    assert all(s == pytest.approx(1.0) for _, _, s, _ in sums)
    pct = query(db, "SELECT layer, sum(share_pct) FROM expert_utilization WHERE strategy = 'single' GROUP BY ALL")
    assert len(pct) == 3 and all(p == pytest.approx(100.0) for _, p in pct)  # layers 0, 1 and all
    ratio, lo, hi = query(db, "SELECT max(measured) FILTER (WHERE metric = 'imbalance_ratio'), "
                              "max(measured) FILTER (WHERE metric = 'expert_share_min_pct'), "
                              "max(measured) FILTER (WHERE metric = 'expert_share_max_pct') "
                              "FROM load_balance WHERE strategy = 'single'")[0]
    assert 0 < lo <= 100 / 8 <= hi and ratio >= 1.0


def test_memory_components_do_not_exceed_the_measured_peak(trained):
    _, db, _ = trained
    ((params, grads, opt, peak, method),) = query(
        db, "SELECT params_bytes, grads_bytes, optimizer_bytes, peak_bytes, peak_method FROM memory")
    model = build_model(load_config("tiny", SMALL).model, 0, "cpu")
    n_tensors = len(list(model.parameters()))
    assert params == 4 * sum(p.numel() for p in model.parameters())  # fp32 on CPU
    assert 0 < grads <= params  # an expert no token chose has no gradient
    assert opt == 2 * params + 4 * n_tensors  # AdamW: two moments and a step count per tensor
    assert params + grads + opt <= peak and method.startswith("ru_maxrss")
    table3 = dict((m, (v, r)) for m, v, r in query(
        db, "SELECT metric, measured, reason FROM table3_memory WHERE strategy = 'single'"))
    assert table3["mem_params_gb"][0] == pytest.approx(params / 1e9)
    assert table3["mem_total_gb"][0] == pytest.approx(peak / 1e9)
    assert table3["mem_activations_gb"][0] is None and "resident set" in table3["mem_activations_gb"][1]
    assert table3["mem_comm_buffers_gb"][0] is None and table3["mem_comm_buffers_gb"][1].startswith("not measured")


# ------------------------------------------------------------------ an injected communication delay


def _delayed_comm_rank(rank: int, world: int, kind: str, delay_s: float, steps: int) -> list[list[dict]]:
    """ep_dp on 2 gloo ranks: `steps` plain steps, then `steps` with `kind` slowed by delay_s."""
    from masep.parallel.base import GlobalBatch
    from masep.runtime.trainer import Trainer

    cfg = load_config("tiny", SMALL_VOCAB + ["parallel.strategy=ep_dp", f"parallel.world_size={world}"])
    trainer = Trainer(cfg, rank)
    timed = trainer.timer.time
    slow = {"on": False}

    @contextmanager
    def time_with_delay(k):
        with timed(k):
            if slow["on"] and k == kind:
                time.sleep(delay_s)
            yield

    trainer.timer.time = time_with_delay  # the strategies time through comm_timer(), this object
    g = torch.Generator().manual_seed(0)
    phases = []
    for delayed in (False, True):
        slow["on"] = delayed
        rows = []
        for _ in range(steps):
            x = torch.randint(0, 1000, (4, 33), generator=g)
            rows.append(trainer.train_step(GlobalBatch(x[:, :-1], x[:, 1:], torch.ones(4, 32))))
        phases.append(rows)
    return phases


def test_injected_delay_raises_exactly_that_kinds_share(tmp_path):
    from masep.testing import run_ranks

    results = run_ranks(2, _delayed_comm_rank, "grad_sync", 0.05, 6, timeout_s=120)
    root = tmp_path / "runs"
    for phase, key in enumerate(("seed=0", "seed=1")):
        write_run_from_rows(root, "ep_dp", key, 2, {"steps": [r for rank_rows in results for r in rank_rows[phase]]})
    db = tmp_path / "db.duckdb"
    collect(root, db)
    shares = {(run_id.endswith("seed=1"), metric): v for run_id, metric, v in query(
        db, "SELECT run_id, metric, value FROM run_metrics WHERE metric LIKE 'comm_%_pct'")}
    base = {m: v for (d, m), v in shares.items() if not d}
    slow = {m: v for (d, m), v in shares.items() if d}
    assert base["comm_moe_dispatch_pct"] > 0 and base["comm_grad_sync_pct"] > 0  # ep_dp uses both
    assert slow["comm_grad_sync_pct"] > base["comm_grad_sync_pct"] + 10
    # The delay is not counted under another kind: per step, none of them grew by half of it
    # (their shares may move by more than a point with the machine's load).
    for kind in ("attn_allreduce", "moe_dispatch", "p2p"):
        per_step = [statistics.mean(r[f"comm_{kind}_s"] for rank_rows in results for r in rank_rows[phase])
                    for phase in (0, 1)]
        assert per_step[1] - per_step[0] < 0.05 / 2, (kind, per_step)


# ------------------------------------------------------------------ views on made-up run folders


def flops(gpus: int, attn_gpus=None, moe_gpus=None) -> dict:
    return {"flops": {"train_flops_per_token": 1e9, "attention_group_flops_per_token": 4e8,
                      "moe_group_flops_per_token": 6e8, "gpus": gpus, "attention_group_gpus": attn_gpus,
                      "moe_group_gpus": moe_gpus, "peak_flops_per_gpu": H200_DENSE_BF16,
                      "peak_source": "test", "peak_reason": None}}


@pytest.fixture
def gpu_study(tmp_path) -> Path:
    """tp_pp and ma_sep on 4 'GPUs', 10 steps each, with telemetry windows; inference of both."""
    root = tmp_path / "runs"
    write_run_from_rows(root, "tp_pp", "seed=0", 4, {
        "steps": train_steps(4, 10, 4000, 2.0, {"attn_allreduce": 0.2, "grad_sync": 0.1},
                             compute={0: 1.0, 1: 1.2, 2: 1.0, 3: 1.2}),
        "energy_window": windows(4, [800.0, 800.0, 800.0, 800.0], 36000, 60.0),
        "experts": [{"step": 0, "layer": 0, "expert": e, "tokens": t} for e, t in enumerate([10, 30, 20, 40])],
    }, {**GPU, **flops(4)})
    write_run_from_rows(root, "ma_sep", "seed=0", 4, {
        "steps": train_steps(4, 10, 4000, 1.0, {"moe_dispatch": 0.25, "grad_sync": 0.05}),
        "energy_window": windows(4, [360.0, 360.0, 720.0, 720.0], 36000, 80.0),
    }, {**GPU, **flops(4, 2, 2)})
    for strategy, tpot in (("tp_pp", 4.0), ("ma_sep", 3.0)):
        write_run_from_rows(root, strategy, "ctx=2048", 4, {"inference": [
            {"rank": r, "context_len": 2048, "batch": 1, "new_tokens": 8, "prefill_ms": 50.0, "tpot_ms": tpot,
             "tokens_per_s": 1000 / tpot} for r in range(4)]}, GPU, experiment="infer")
    return root


def test_views_compute_the_paper_figures_from_measured_rows(gpu_study, tmp_path):
    db = tmp_path / "db.duckdb"
    collect(gpu_study, db)
    t1 = {(m, s): (claim, v) for m, s, claim, v in query(
        db, "SELECT metric, strategy, paper_claim, measured FROM table1_performance")}
    # steady steps 1-9: tokens / time on rank 0
    assert t1[("throughput_tok_s", "tp_pp")] == (139136.0, pytest.approx(2000.0))
    assert t1[("tps_per_gpu", "ma_sep")] == (13289.0, pytest.approx(1000.0))
    assert t1[("tps_increase_pct", "ma_sep")] == (52.8, pytest.approx(100.0))
    assert t1[("tpot_ms", "ma_sep")] == (1.82, 3.0)
    assert t1[("tpot_reduction_pct", "ma_sep")] == (34.2, pytest.approx(25.0))
    assert t1[("gpu_util_pct", "ma_sep")] == (89.7, pytest.approx(81.5))  # ranks at 80, 81, 82, 83
    assert t1[("mfu_pct", "ma_sep")][1] == pytest.approx(100 * 4000 * 1e9 / (4 * H200_DENSE_BF16))
    assert t1[("mfu_attention_group_pct", "ma_sep")][1] == pytest.approx(100 * 4000 * 4e8 / (2 * H200_DENSE_BF16))
    assert t1[("mfu_moe_group_pct", "ma_sep")][1] == pytest.approx(100 * 4000 * 6e8 / (2 * H200_DENSE_BF16))
    assert query(db, "SELECT reason FROM table1_performance WHERE metric = 'mfu_moe_group_pct' "
                     "AND strategy = 'tp_pp'") == [("one group: only ma_sep splits attention and experts",)]
    assert t1[("tps_per_gpu", "pp")] == (7692.0, None)  # claimed, not run
    t2 = {(m, s): v for m, s, v in query(db, "SELECT metric, strategy, measured FROM table2_communication")}
    assert t2[("comm_attn_allreduce_pct", "tp_pp")] == pytest.approx(10.0)
    assert t2[("comm_moe_dispatch_pct", "ma_sep")] == pytest.approx(25.0)
    assert t2[("comm_total_pct", "ma_sep")] == pytest.approx(30.0)
    # nothing broadcasts parameters: the paper's row stays NULL with the reason, never 0.0
    assert query(db, "SELECT DISTINCT measured, reason FROM table2_communication WHERE metric = 'comm_param_bcast_pct' "
                     "AND strategy = 'ma_sep'") == [(None, "not measured: no strategy broadcasts parameters "
                                                           "(every rank builds the seed's weights)")]
    energy = {(m, s): v for m, s, v in query(db, "SELECT metric, strategy, measured FROM energy")}
    # sum over ranks of rank energy / window tokens: 4 x 800 J / 36000 and (2 x 360 + 2 x 720) J / 36000
    assert energy[("energy_per_token_mj", "tp_pp")] == pytest.approx(1e3 * 3200 / 36000)
    assert energy[("energy_per_token_mj", "ma_sep")] == pytest.approx(1e3 * 2160 / 36000)
    assert energy[("energy_reduction_pct", "ma_sep")] == pytest.approx(100 * (3200 - 2160) / 3200)
    assert energy[("pue", "ma_sep")] is None
    lb = {(m, s): (v, r) for m, s, v, r in query(db, "SELECT metric, strategy, measured, reason FROM load_balance")}
    assert lb[("exec_time_std_s", "tp_pp")] == (pytest.approx(0.1), None)  # population std of 1.0, 1.2, 1.0, 1.2
    assert lb[("imbalance_ratio", "tp_pp")] == (pytest.approx(4.0), None)
    assert lb[("expert_share_std", "tp_pp")][0] == pytest.approx(np.std([.1, .3, .2, .4]))  # population std
    assert lb[("lb_loss_weighted", "ma_sep")] == (pytest.approx(0.011), None)
    assert lb[("imbalance_ratio", "ma_sep")] == (None, "no expert token counts")
    t4 = {(s, x): v for s, x, v in query(db, "SELECT strategy, x, measured FROM table4_tpot WHERE metric = 'tpot_ms'")}
    assert t4[("tp_pp", 2048)] == 4.0 and t4[("ma_sep", 512)] is None


def test_views_answer_on_a_partial_study(tmp_path):
    (tmp_path / "runs").mkdir()
    db = tmp_path / "db.duckdb"
    collect(tmp_path / "runs", db)
    for view in ("table1_performance", "table2_communication", "table3_memory", "table4_tpot", "scaling",
                 "expert_utilization", "convergence", "energy", "repeat_stats", "load_balance", "model_quality"):
        assert query(db, f"SELECT count(*) FROM {view}")[0][0] > 0, view  # the paper's claims, nothing measured
    assert query(db, "SELECT count(*) FROM table1_performance WHERE measured IS NOT NULL") == [(0,)]
    assert query(db, "SELECT DISTINCT reason FROM table2_communication") == [("no run of this strategy in the study",)]
    assert query(db, "SELECT count(*), sum(value) FILTER (WHERE stat = 'value' AND metric = 'expert_share_pct') "
                     "FROM paper_claims")[0][1] == pytest.approx(112.9)


# ------------------------------------------------------------------ repeats


def test_repeat_stats_ci_matches_scipy(tmp_path):
    root = tmp_path / "runs"
    tps = {"ma_sep": [1010.0, 1200.0, 1090.0, 1130.0], "tp_pp": [800.0, 790.0, 850.0, 810.0]}
    for strategy, values in tps.items():
        for seed, v in enumerate(values):
            write_run_from_rows(root, strategy, f"seed={seed}", 1, {"steps": train_steps(1, 10, int(v), 1.0)},
                                seed=seed)
    db = tmp_path / "db.duckdb"
    collect(root, db)
    rows = {(s, m): r for s, m, *r in query(
        db, "SELECT strategy, metric, n, mean, std, ci_low, ci_high, paper_mean, paper_ci_low FROM repeat_stats "
            "WHERE metric IN ('tps_per_gpu', 'tps_increase_pct')")}
    for strategy, values in tps.items():
        n, mean, std, lo, hi, _, _ = rows[(strategy, "tps_per_gpu")]
        want = stats.t.interval(0.95, len(values) - 1, loc=stats.tmean(values), scale=stats.sem(values))
        assert (n, mean, std) == (4, pytest.approx(stats.tmean(values)), pytest.approx(stats.tstd(values)))
        assert (lo, hi) == (pytest.approx(want[0], rel=1e-9), pytest.approx(want[1], rel=1e-9))
    gains = [100 * (a - b) / b for a, b in zip(tps["ma_sep"], tps["tp_pp"])]  # paired by seed
    n, mean, std, lo, hi, paper_mean, paper_lo = rows[("ma_sep", "tps_increase_pct")]
    want = stats.t.interval(0.95, 3, loc=stats.tmean(gains), scale=stats.sem(gains))
    assert n == 4 and mean == pytest.approx(stats.tmean(gains))
    assert (lo, hi) == (pytest.approx(want[0]), pytest.approx(want[1]))
    assert (paper_mean, paper_lo) == (52.8, 49.6)
    one = query(db, "SELECT n, std, ci_low, reason FROM repeat_stats WHERE metric = 'tpot_reduction_pct'")
    assert one == [(0, None, None, "no run of this strategy in the study")]


def test_t_table_matches_scipy(tmp_path):
    (tmp_path / "runs").mkdir()
    collect(tmp_path / "runs", tmp_path / "db.duckdb")
    table = query(tmp_path / "db.duckdb", "SELECT df, t FROM t_critical_95 ORDER BY df")
    assert [df for df, _ in table] == list(range(1, 101))
    assert all(t == pytest.approx(stats.t.ppf(0.975, df), rel=1e-9) for df, t in table)


def test_cpu_figures_beside_claims_say_they_are_not_comparable(gpu_study, tmp_path):
    """A figure from CPU ranks (the embedded default) is marked beside the paper's 16-GPU claim."""
    write_run_from_rows(gpu_study, "tp", "seed=0", 4, {"steps": train_steps(4, 10, 4000, 2.0)}, {"device": "cpu"})
    db = tmp_path / "db.duckdb"
    collect(gpu_study, db)
    note = dict(query(db, "SELECT strategy, note FROM table1_performance WHERE metric = 'throughput_tok_s' "
                          "AND measured IS NOT NULL"))
    assert note["tp"].startswith("CPU run: not comparable with the paper's 16-GPU figure")
    assert "CPU run" not in (note["tp_pp"] or "")
