"""Fault trials: the injector's seeded plan, a full restart after a SIGKILL sent by the launcher's
injector to a rank's pid (ep_dp on 3 CPU ranks) against an uninterrupted reference, and the
robustness views on synthetic rows."""
from __future__ import annotations

import subprocess
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from masep.config import ConfigError, load_config
from masep.faults import FaultError, plan
from masep.parallel.layout import make_layout
from masep.results.collect import SQL_DIR


def _cfg(strategy: str, *sets: str):
    return load_config("tiny", [f"parallel.strategy={strategy}", "parallel.world_size=4", "train.steps=20",
                                "train.checkpoint_every=5", *sets])


def test_plan_is_seeded_and_picks_ranks_by_role():
    cfg = _cfg("ma_sep", "fault.kind=kill_moe", "fault.seed=3")
    layout = make_layout(cfg)
    assert plan(cfg, layout) == plan(cfg, layout)
    p = plan(cfg, layout)
    assert p["ranks"][0] in layout.moe_rank_list and 1 <= p["step"] <= 18 and p["signal"] == "SIGKILL"
    for seed in range(10):
        attn = plan(_cfg("ma_sep", "fault.kind=kill_attention", f"fault.seed={seed}"), layout)
        assert attn["ranks"][0] in layout.attention_ranks
        tp = _cfg("tp", "fault.kind=kill_checkpoint", f"fault.seed={seed}")
        ckpt = plan(tp, make_layout(tp))
        assert (ckpt["step"] + 1) % 5 == 0 and ckpt["ranks"][0] != 0
        assert plan(_cfg("tp", "fault.kind=stop", f"fault.seed={seed}"), make_layout(tp))["signal"] == "SIGSTOP"
    ep_dp = _cfg("ep_dp", "fault.kind=kill_attention")
    hit = {plan(_cfg("ep_dp", "fault.kind=kill_attention", f"fault.seed={s}"), make_layout(ep_dp))["ranks"][0]
           for s in range(30)}
    assert hit == {1, 2, 3}  # any rank but rank 0, which hosts the rendezvous store


def test_plan_refuses_more_than_half_the_attention_ranks():
    cfg = _cfg("ma_sep", "fault.kind=kill_attention_k", "fault.count=2")  # 2 attention ranks
    with pytest.raises(FaultError, match="at most half"):
        plan(cfg, make_layout(cfg))
    short = _cfg("tp", "fault.kind=stop", "train.steps=2")
    with pytest.raises(FaultError, match="fault.min_step"):
        plan(short, make_layout(short))
    with pytest.raises(ConfigError, match="fault.kind"):
        _cfg("tp", "fault.kind=meteor")


# ------------------------------------------------------------------ the robustness views


def _views(rows: list[dict]) -> duckdb.DuckDBPyConnection:
    import pyarrow as pa

    con = duckdb.connect()
    synthetic = pa.Table.from_pylist(rows)  # noqa: F841 - read by the query below
    con.execute("CREATE TABLE faults AS SELECT * FROM synthetic")
    for name in ("60_paper_claims.sql", "65_robustness.sql"):
        con.execute((SQL_DIR / name).read_text())
    return con


def _row(strategy, kind, recovery_s, failed=1, before=100.0, after=100.0, diff=0.0, lost=0):
    return {"run_id": f"{strategy}/{kind}/{recovery_s}", "strategy": strategy, "kind": kind,
            "failed_ranks": failed, "t_injected_unix_s": 1.0, "detection_s": 0.1, "recovery_s": recovery_s,
            "recovery_mode": "full_restart", "steps_replayed": 2, "batches_lost": lost, "batches_repeated": 0,
            "batches_mismatched": 0, "throughput_before_tok_s": before, "throughput_after_tok_s": after,
            "final_loss_abs_diff": diff}


def test_robustness_view_on_synthetic_rows():
    rows = [_row("tp", "kill_attention", float(s)) for s in range(1, 11)]
    rows += [_row("ma_sep", "kill_moe", 1.0), _row("ma_sep", "kill_moe", 2.0, diff=1e-3),
             _row("ma_sep", "kill_moe", 3.0, lost=1), _row("ma_sep", "kill_moe", 4.0)]
    # a linear degradation: 100 tok/s less per failed rank, and one point off the line
    rows += [_row("ma_sep", "kill_attention_k", 1.0, failed=k, before=400.0, after=400.0 - 100 * k)
             for k in (1, 2, 2)]
    con = _views(rows)
    tp = con.execute("SELECT trials, correct_trials, recovery_p50_s, recovery_p95_s, paper_recovery_s, "
                     "paper_success_pct FROM robustness WHERE strategy = 'tp'").fetchone()
    assert tp[:4] == (10, 10, 5.5, pytest.approx(9.55)) and tp[4:] == (8.7, None)
    moe = con.execute("SELECT trials, correct_trials, success_pct, paper_recovery_s, paper_success_pct "
                      "FROM robustness WHERE kind = 'kill_moe'").fetchone()
    assert moe == (4, 2, 50.0, 2.3, 99.2)
    curve = con.execute("SELECT failed_ranks, points, throughput_tok_s, slope_tok_s_per_rank, r2 "
                        "FROM robustness_degradation WHERE strategy = 'ma_sep'").fetchall()
    assert [c[:3] for c in curve] == [(0, 3, 400.0), (1, 1, 300.0), (2, 2, 200.0)]
    assert curve[0][3] == pytest.approx(-100.0) and curve[0][4] == pytest.approx(1.0)


def test_robustness_views_exist_without_fault_trials():
    con = duckdb.connect()
    for name in ("60_paper_claims.sql", "65_robustness.sql"):
        con.execute((SQL_DIR / name).read_text())
    assert con.execute("SELECT count(*) FROM robustness").fetchone() == (0,)
    assert con.execute("SELECT count(*) FROM robustness_degradation").fetchone() == (0,)


# ------------------------------------------------------------------ a full restart, end to end

SETS = ["train.steps=8", "train.checkpoint_every=3", "train.eval_every=4", "train.log_every=1",
        "train.global_batch=6", "data.seq_len=32", "model.experts=6", "parallel.timeout_s=10"]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    from masep.data import tokenize as tok

    root = tmp_path_factory.mktemp("tokens")
    tok.tokenize_shard(load_config("tiny", [f"data.tokens_dir={root}"]).data, 0)
    return root


def train(tmp: Path, tokens: Path, out: Path, *extra: str, strategy: str = "ep_dp", world: int = 3) -> str:
    cmd = ["masep", "train", "--config", "tiny", "--strategy", strategy, "--world-size", str(world), "--set",
           f"data.tokens_dir={tokens}", f"launch.log_dir={tmp}/logs", *SETS, *extra, "--out", str(out)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tokens) -> Path:
    tmp = tmp_path_factory.mktemp("reference")
    train(tmp, tokens, tmp / "runs" / "reference")
    return tmp / "runs" / "reference"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["kill_attention", "stop", "kill_checkpoint"])
def test_full_restart_after_a_lost_rank_equals_the_uninterrupted_run(tmp_path, tokens, reference, kind):
    out = tmp_path / "runs" / kind
    # seed 0: rank 2, after step 4 (kill_checkpoint: while writing the checkpoint after step 5)
    log = train(tmp_path, tokens, out, "launch.max_restarts=1", f"fault.kind={kind}", "fault.seed=0",
                f"fault.reference={reference}")
    [row] = pq.read_table(out / "faults-rank0.parquet").to_pylist()
    assert row["step_injected"] == row["planned_step"]  # the injector hits the step it planned
    steps = pq.read_table(out / "steps-rank0.parquet").to_pylist()
    ref = pq.read_table(reference / "steps-rank0.parquet").to_pylist()
    assert [r["step"] for r in steps] == list(range(8))  # no step lost or repeated
    assert [r["batch_crc32"] for r in steps] == [r["batch_crc32"] for r in ref]
    assert steps[-1]["loss"] == pytest.approx(ref[-1]["loss"], abs=1e-5)
    # the newest complete checkpoint: step 3 (kill_checkpoint: 6 if the write finished first)
    resumed = row["resumed_from_step"]
    assert resumed == 3 or (kind == "kill_checkpoint" and resumed == 6)
    assert row["recovery_mode"] == "full_restart" and row["restarts"] == 1
    assert row["steps_replayed"] == row["step_injected"] + 1 - resumed
    assert (row["batches_completed"], row["batches_lost"], row["batches_repeated"], row["batches_mismatched"]) == (8, 0, 0, 0)
    assert 0 < row["detection_s"] < row["recovery_s"] and row["final_loss_abs_diff"] <= 1e-5
    rank = row["target_ranks"]
    assert f"rank {rank} " in next(l for l in log.splitlines() if "restarting every rank" in l)
    signal = "SIGSTOP" if kind == "stop" else "SIGKILL"
    assert f"fault {kind} ({signal}) of rank(s) {rank} after step {row['step_injected']}: recovered by " \
           f"full restart from step {resumed}" in log


def test_fault_rows_in_job_and_a_restart_before_the_fault():
    """In the job: detection and recovery from the survivors' recovery rows and the next step
    completed after them; a restart before the injection (a rank that could not start) is not
    the fault's recovery."""
    from masep.faults import fault_rows

    record = {"strategy": "ma_sep", "kind": "kill_attention", "seed": 0, "step": 1, "signal": "SIGKILL",
              "t_injected": 100.0, "hit": [{"rank": 1, "pid": 9, "step_done": 1, "phase": "train"}],
              "restarts": [{"restart": 1, "t_detected": 50.0, "message": "rank 3 could not connect"}]}
    steps = [{"step": s, "t_end_unix_s": t, "tokens_per_s": 10.0, "loss": 1.0, "batch_crc32": s}
             for s, t in enumerate([90.0, 99.0, 103.5, 104.0])]
    recovery = [{"rank": r, "detected_unix_s": t, "steps_redone": 1} for r, t in ((0, 100.5), (2, 100.2))]
    [row] = fault_rows("run", record, steps, 4, 0, None, recovery)
    assert (row["recovery_mode"], row["restarts"], row["resumed_from_step"], row["steps_replayed"]) == ("in_job", 1, None, 1)
    assert row["detection_s"] == pytest.approx(0.2) and row["recovery_s"] == pytest.approx(3.5)
    assert (row["batches_completed"], row["batches_lost"], row["batches_repeated"]) == (4, 0, 0)


# ------------------------------------------------------------------ an expert failure while decoding

DECODE_SETS = ["infer.context_lengths=[16,32,48]", "infer.new_tokens=8", "infer.warmup_tokens=2",
               "model.capacity_factor=null", "parallel.timeout_s=10"]


def test_decode_plan_counts_tokens_and_kills_a_moe_rank():
    for seed in range(10):
        cfg = _cfg("ma_sep", *DECODE_SETS, "fault.kind=kill_moe_decode", f"fault.seed={seed}")
        p = plan(cfg, make_layout(cfg), "infer")
        # 3 requests of 1 warm-up + 7 timed streamed tokens: the kill comes before the last one's half
        assert p["ranks"][0] in make_layout(cfg).moe_rank_list and 1 <= p["step"] <= 20
    tp = _cfg("tp", *DECODE_SETS, "fault.kind=kill_moe_decode")
    assert plan(tp, make_layout(tp), "infer")["ranks"][0] != 0
    with pytest.raises(FaultError, match="masep infer"):
        plan(tp, make_layout(tp))
    attn = _cfg("tp", "fault.kind=kill_attention")
    with pytest.raises(FaultError, match="masep train"):
        plan(attn, make_layout(attn), "infer")


def test_robustness_view_counts_decode_requests():
    decode = {"kind": "kill_moe_decode", "t_injected_unix_s": 1.0, "recovery_s": 3.0, "failed_ranks": 1,
              "recovery_mode": "full_restart", "requests_total": 3, "requests_retried": 1}
    rows = [{**decode, "run_id": f"d{i}", "strategy": "ma_sep", "requests_correct": c, "requests_lost": lost}
            for i, (c, lost) in enumerate([(3, 0), (3, 0), (2, 0), (2, 1)])]
    con = _views(rows)
    got = con.execute("SELECT trials, correct_trials, success_pct, paper_success_pct, requests_total, "
                      "requests_correct, requests_retried, requests_lost FROM robustness").fetchone()
    assert got == (4, 2, 50.0, 99.2, 12, 10, 4, 1)


def infer(tmp: Path, tokens: Path, strategy: str, world: int, out: Path, *extra: str) -> str:
    cmd = ["masep", "infer", "--config", "tiny", "--strategy", strategy, "--world-size", str(world), "--set",
           f"data.tokens_dir={tokens}", f"launch.log_dir={tmp}/logs", *DECODE_SETS, *extra, "--out", str(out)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout


@pytest.mark.slow
@pytest.mark.timeout(1200)  # two 4-rank jobs and a restart: minutes on a loaded 2-core machine
@pytest.mark.parametrize("strategy,world", [("ma_sep", 4)])  # a baseline's full restart: the training kinds above
def test_restart_after_a_moe_rank_killed_while_decoding_gives_the_reference_tokens(tmp_path, tokens, strategy, world):
    ref, out = tmp_path / "runs" / "reference", tmp_path / "runs" / "kill_moe_decode"
    infer(tmp_path, tokens, strategy, world, ref)
    log = infer(tmp_path, tokens, strategy, world, out, "launch.max_restarts=1", "fault.kind=kill_moe_decode",
                "fault.seed=1", f"fault.reference={ref}", "--experiment", "faults")
    [row] = pq.read_table(out / "faults-rank0.parquet").to_pylist()
    layout = make_layout(_cfg(strategy, f"parallel.world_size={world}"))
    assert int(row["target_ranks"]) in (layout.moe_rank_list if strategy == "ma_sep" else [1, 2, 3])
    assert row["step_injected"] >= row["planned_step"] and row["phase_injected"] == "decode"
    assert row["recovery_mode"] == "full_restart" and row["restarts"] == 1
    assert 0 < row["detection_s"] < row["recovery_s"]
    # every request completed; the one in flight at the kill was decoded again, with the same tokens
    got = pq.read_table(out / "requests-rank0.parquet").to_pylist()
    want = pq.read_table(ref / "requests-rank0.parquet").to_pylist()
    assert [(r["request"], r["tokens"]) for r in got] == [(r["request"], r["tokens"]) for r in want]
    assert sum(r["retried"] for r in got) == 1 == row["requests_retried"]
    assert (row["requests_total"], row["requests_correct"], row["requests_lost"]) == (3, 3, 0)
    assert f"fault kill_moe_decode (SIGKILL) of rank(s) {row['target_ranks']} after decoded token " \
           f"{row['step_injected']}: recovered by restarting the inference job" in log
