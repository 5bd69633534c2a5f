"""masep bench-import: GPU benchmark summaries as run folders that masep collect loads like any run.

Uses a tiny CPU benchmark run made here (current summary format) and the committed H200 summary
bench/history/h200-single-v2.json (older format: no FLOP record, no per-rank energy).
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from masep.bench_ingest import NO_RANK_ENERGY, BenchImportError, import_summaries, stamp_of
from masep.cli import main as cli
from masep.results.collect import collect

ROOT = Path(__file__).resolve().parent.parent
V2 = ROOT / "bench" / "history" / "h200-single-v2.json"


@pytest.fixture(scope="module")
def cpu_summary(tmp_path_factory) -> Path:
    """A summary of the tiny preset on CPU: 2 timed steps, decoding at context 32."""
    out = tmp_path_factory.mktemp("bench") / "single.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-m", "masep.bench", "--config", "tiny", "--warmup", "1", "--steps", "2",
                          "--decode", "--set", "train.global_batch=4", "train.micro_batch=2",
                          "infer.context_lengths=[32]", "infer.new_tokens=4", "--out", str(out)],
                         cwd=out.parent, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _db(runs: Path, tmp_path: Path) -> duckdb.DuckDBPyConnection:
    db = tmp_path / "x.duckdb"
    collect(runs, db)
    return duckdb.connect(str(db), read_only=True)


def _metric(con, run_id: str, metric: str, x=None):
    return con.execute("SELECT value, reason FROM run_metrics WHERE run_id = ? AND metric = ? "
                       "AND x IS NOT DISTINCT FROM ?", [run_id, metric, x]).fetchone()


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cpu_summary_becomes_a_run(cpu_summary, tmp_path):
    s = json.loads(cpu_summary.read_text())
    runs = tmp_path / "runs"
    assert cli(["bench-import", str(cpu_summary), "--runs", str(runs)]) == 0
    run_id = f"bench/single/{stamp_of(s['date'])}"
    folder = runs / run_id
    assert sorted(p.name for p in folder.iterdir()) == [
        "energy_window-rank0.parquet", "inference-rank0.parquet", "run.json", "steps-rank0.parquet"]
    run = json.loads((folder / "run.json").read_text())
    assert run["device"] == "cpu" and run["flops"] == s["flops"] and run["hardware"] == {"gpus": []}
    assert run["bench"] == {k: v for k, v in s.items() if k != "steps"}
    with _db(runs, tmp_path) as con:
        assert con.execute("SELECT run_id, experiment, strategy, seed, world_size, status, git_commit "
                           "FROM runs").fetchall() == [
            (run_id, "bench", "single", 0, 1, "completed", s["git_commit"])]
        # the step rows are the summary's
        rows = con.execute("SELECT step, rank, tokens, loss, step_time_s, compute_s, peak_mem_bytes "
                           "FROM steps ORDER BY rank, step").fetchall()
        assert len(rows) == len(s["steps"]) == 2
        assert rows == [(r["step"], r["rank"], r["tokens"], r["loss"], r["step_time_s"], r["compute_s"],
                         r["peak_mem_bytes"]) for r in sorted(s["steps"], key=lambda r: (r["rank"], r["step"]))]
        # decoding: the summary's TPOT, tokens/s = batch / TPOT, the HBM bound kept
        d = s["decode"][0]
        assert con.execute("SELECT context_len, batch, new_tokens, prefill_ms, tpot_ms, tokens_per_s, hbm_bound_ms "
                           "FROM inference").fetchall() == [
            (32, 1, 4, d["prefill_ms"], d["tpot_ms"], 1000.0 / d["tpot_ms"], d["hbm_bound_ms"])]
        assert _metric(con, run_id, "tpot_ms", 32) == (d["tpot_ms"], None)
        # CPU: no MFU and no energy, each with its reason
        assert _metric(con, run_id, "mfu_pct") == (None, "no GPU peak for CPU")
        assert _metric(con, run_id, "energy_per_token_mj") == (None, "no GPU")
        assert con.execute("SELECT rank, steps, tokens, window_s, gpu_energy_j, energy_reason FROM energy_by_rank"
                           ).fetchall() == [(0, 2, s["timed_tokens"], s["timed_wall_s"], None, "no GPU")]
        # throughput is measured (steady steps: the first of the two is left out as warm-up)
        last = max(s["steps"], key=lambda r: r["step"])
        assert _metric(con, run_id, "throughput_tok_s")[0] == pytest.approx(last["tokens"] / last["step_time_s"])


def test_committed_h200_summary_old_format(tmp_path):
    s = json.loads(V2.read_text())
    assert "flops" not in s and "energy_j_by_rank" not in s  # the older format
    runs = tmp_path / "runs"
    import_summaries([V2], runs)
    run_id = "bench/single/20261129T044725Z"
    run = json.loads((runs / run_id / "run.json").read_text())
    assert run["device"] == "cuda" and run["hardware"] == {"gpus": ["NVIDIA H200"]}
    assert run["flops"]["peak_flops_per_gpu"] == s["peak_flops"] and run["flops"]["gpu_name"] == "NVIDIA H200"
    assert run["versions"] == {"torch": "2.11.0+cu130"} and run["git_commit"] is None
    with _db(runs, tmp_path) as con:
        # MFU from the FLOP record rebuilt from the config: the summary's, at the summary's
        # throughput (tokens per step / median step time) ...
        mfu_per_tok_s = con.execute(
            "SELECT m.value / 100 / t.value FROM run_metrics m JOIN run_metrics t USING (run_id) "
            "WHERE m.metric = 'mfu_pct' AND t.metric = 'throughput_tok_s'").fetchone()[0]
        assert mfu_per_tok_s * s["tokens_per_s"] == pytest.approx(s["mfu"], rel=1e-6)
        median_mfu = con.execute(
            "SELECT any_value(s.tokens) / median(s.step_time_s) * CAST(r.flops ->> 'train_flops_per_token' AS DOUBLE)"
            " / (CAST(r.flops ->> 'gpus' AS DOUBLE) * CAST(r.flops ->> 'peak_flops_per_gpu' AS DOUBLE)) "
            "FROM steps s JOIN run_info r USING (run_id) WHERE s.rank = 0 GROUP BY r.flops").fetchone()[0]
        assert median_mfu == pytest.approx(s["mfu"], rel=1e-6)
        # ... and the views' own MFU (mean over steady steps) within 1% of it
        mfu_pct, reason = _metric(con, run_id, "mfu_pct")
        assert reason is None and mfu_pct == pytest.approx(100 * s["mfu"], rel=1e-2)
        assert con.execute("SELECT measured, runs FROM table1_performance WHERE metric = 'mfu_pct' "
                           "AND strategy = 'single'").fetchone() == (mfu_pct, 1)
        steady = con.execute("SELECT sum(tokens) / sum(step_time_s) FROM steady_steps").fetchone()[0]
        assert con.execute("SELECT measured FROM table1_performance WHERE metric = 'tps_per_gpu' "
                           "AND strategy = 'single'").fetchone()[0] == pytest.approx(steady, rel=1e-12)
        assert steady == pytest.approx(s["tokens_per_s"], rel=1e-2)
        # TPOT by context: the summary's
        tpot = {d["context_len"]: d["tpot_ms"] for d in s["decode"]}
        assert dict(con.execute("SELECT x, measured FROM table4_tpot WHERE metric = 'tpot_ms' "
                                "AND strategy = 'single' AND measured IS NOT NULL").fetchall()) == tpot
        # energy: one GPU, so rank 0 holds the summary's total
        assert con.execute("SELECT rank, steps, tokens, gpu_energy_j, gpu_energy_per_token_mj, energy_reason "
                           "FROM energy_by_rank").fetchall() == [
            (0, 6, 6 * 65536, s["energy_j"], pytest.approx(1e3 * s["energy_per_token_j"], rel=1e-12), None)]
        assert _metric(con, run_id, "energy_per_token_mj")[0] == pytest.approx(1e3 * s["energy_per_token_j"])
        # synthetic batches: no quality figures for a benchmark run
        assert _metric(con, run_id, "final_train_loss") is None


def test_old_multi_gpu_summary_has_no_per_rank_energy(cpu_summary, tmp_path):
    s = json.loads(cpu_summary.read_text())
    old = copy.deepcopy(s)
    for key in ("flops", "energy_j_by_rank", "energy_reason_by_rank", "timed_steps", "timed_tokens",
                "versions", "git_commit"):
        del old[key]
    old.update(label="ep_dp2", strategy="ep_dp", world_size=2, device="NVIDIA H200", energy_j=12.5,
               energy_reason=None, steps=s["steps"] + [{**r, "rank": 1} for r in s["steps"]])
    old["config"]["parallel"].update(strategy="ep_dp", world_size=2)
    path = tmp_path / "ep_dp2.json"
    path.write_text(json.dumps(old))
    runs = tmp_path / "runs"
    import_summaries([path], runs)
    run_id = f"bench/ep_dp2/{stamp_of(s['date'])}"
    with _db(runs, tmp_path) as con:
        assert con.execute("SELECT rank, steps, gpu_energy_j, energy_reason FROM energy_by_rank").fetchall() == [
            (0, 2, None, NO_RANK_ENERGY), (1, 2, None, NO_RANK_ENERGY)]
        assert _metric(con, run_id, "energy_per_token_mj") == (None, NO_RANK_ENERGY)
        # the FLOP record rebuilt for two H200s
        flops = json.loads(con.execute("SELECT flops FROM run_info").fetchone()[0])
        assert flops["gpus"] == 2 and flops["peak_flops_per_gpu"] == 790e12
        assert flops["train_flops_per_token"] == s["flops"]["train_flops_per_token"]
        throughput = _metric(con, run_id, "throughput_tok_s")[0]
        assert _metric(con, run_id, "mfu_pct")[0] == pytest.approx(
            100 * throughput * flops["train_flops_per_token"] / (2 * 790e12), rel=1e-12)
        assert con.execute("SELECT rank, count(*) FROM steps GROUP BY rank ORDER BY rank").fetchall() == [(0, 2), (1, 2)]


def test_reimport_is_idempotent(tmp_path):
    runs = tmp_path / "runs"
    assert cli(["bench-import", str(V2), "--runs", str(runs)]) == 0
    folder = runs / "bench/single/20261129T044725Z"
    before = _tree(folder)
    assert cli(["bench-import", str(V2), "--runs", str(runs)]) == 0
    assert _tree(folder) == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["20261129T044725Z"]  # no temp folders left
    with _db(runs, tmp_path) as con:
        assert con.execute("SELECT count(*) FROM runs").fetchone() == (1,)
        assert con.execute("SELECT count(*) FROM steps").fetchone() == (6,)


def test_bad_files_fail_and_leave_imported_runs_alone(tmp_path):
    runs = tmp_path / "runs"
    import_summaries([V2], runs)
    folder = runs / "bench/single/20261129T044725Z"
    before = _tree(runs)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(V2.read_text()[:500])
    missing = tmp_path / "missing.json"
    for files in ([corrupt], [V2, corrupt], [missing]):
        res = subprocess.run([sys.executable, "-m", "masep.cli", "bench-import", *map(str, files),
                              "--runs", str(runs)], capture_output=True, text=True, timeout=300)
        assert res.returncode == 1 and res.stdout == ""
        bad = files[-1]
        assert res.stderr.count("\n") == 1 and res.stderr.startswith(f"masep bench-import: {bad}: "), res.stderr
        assert _tree(runs) == before
    assert "not valid JSON" in subprocess.run(
        [sys.executable, "-m", "masep.cli", "bench-import", str(corrupt), "--runs", str(runs)],
        capture_output=True, text=True, timeout=300).stderr
    # a summary without step rows, and one whose label cannot name a folder
    s = json.loads(V2.read_text())
    for change, message in (({"steps": []}, "steps: no step rows"), ({"label": "../x"}, "cannot name a folder"),
                            ({"decode": [{"context_len": 1, "batch": 1, "prefill_ms": 1.0, "tpot_ms": "fast"}]},
                             "decode or energy figures")):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({**s, **change}))
        with pytest.raises(BenchImportError, match=message):
            import_summaries([bad], runs)
    assert _tree(runs) == before and folder.is_dir()


def test_other_json_files_are_skipped(tmp_path, capsys):
    other = tmp_path / "variants.json"
    other.write_text(json.dumps({"command": "bench_variants", "device": "NVIDIA H200", "train": {}}))
    runs = tmp_path / "runs"
    assert cli(["bench-import", str(V2), str(other), "--runs", str(runs)]) == 0
    err = capsys.readouterr().err
    assert f"{other}: not a benchmark summary" in err
    assert [p.name for p in (runs / "bench").iterdir()] == ["single"]


def test_benchmark_runs_any_world_size_under_torchrun(tmp_path):
    """The benchmark takes the world size torchrun gives it: ma_sep on 4 CPU ranks (2 attention
    replicas, 2 MoE ranks) writes one summary holding every rank, its transfers timed, decoding."""
    out = tmp_path / "ma_sep4.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                          "-m", "masep.bench", "--config", "tiny", "--warmup", "1", "--steps", "2", "--decode",
                          "--set", "parallel.strategy=ma_sep", "parallel.attn_tp=1", "parallel.attn_replicas=2",
                          "parallel.moe_ranks=2", "train.global_batch=8", "train.micro_batch=2",
                          "infer.context_lengths=[32]", "infer.new_tokens=4", "--label", "ma_sep4", "--out", str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads(out.read_text())
    assert (s["label"], s["strategy"], s["world_size"]) == ("ma_sep4", "ma_sep", 4)
    assert sorted(int(r) for r in s["peak_mem_bytes_by_rank"]) == [0, 1, 2, 3]
    assert sorted(int(r) for r in s["energy_reason_by_rank"]) == [0, 1, 2, 3]
    assert s["tokens_per_s_per_gpu"] == pytest.approx(s["tokens_per_s"] / 4)
    assert s["comm_median_s"]["moe_dispatch"] > 0 and s["comm_median_s"]["attn_allreduce"] == 0
    assert [d["context_len"] for d in s["decode"]] == [32] and s["decode"][0]["tpot_ms"] > 0
    assert {r["rank"] for r in s["steps"]} == {0, 1, 2, 3}
