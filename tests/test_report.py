"""masep report: renders from the database alone; missing values read "not measured"."""
from __future__ import annotations

import os
from html import escape as html_escape
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import duckdb
import pytest

from masep.report import FIGURES
from masep.report.render import ReportError, bench_section, render, tpot_figure
from masep.results.collect import collect
from helpers import render_section, row_cells, write_sample_run

FILES = ["figures/loss_curves.png", "figures/loss_curves.svg", "figures/throughput.png",
         "figures/throughput.svg", "figures/tpot.png", "figures/tpot.svg", "index.html"]
# what the workflow's report rule declares: every figure, whatever the database holds
ALL_FILES = sorted([f"figures/{n}.{ext}" for n in FIGURES for ext in ("png", "svg")] + ["index.html"])


def _files(out):
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def test_report_from_a_study(tmp_path):
    runs = tmp_path / "runs"
    write_sample_run(runs, "train", "single", "seed=0", steps=10, evals=[(10, 3.5)])
    write_sample_run(runs, "train", "single", "seed=1", steps=10, seed=1, evals=[(10, 3.7)])
    write_sample_run(runs, "train", "ep_dp", "seed=0", world_size=2, steps=10)
    write_sample_run(runs, "infer", "single", "ctx=512", contexts=(512,))
    write_sample_run(runs, "infer", "single", "ctx=2048", contexts=(2048,))
    write_sample_run(runs, "infer", "ep_dp", "ctx=512", world_size=2, contexts=(512,))
    db = tmp_path / "masep.duckdb"
    collect(runs, db)
    shutil.rmtree(runs)  # the report reads the database only
    out = tmp_path / "reports"
    written = render(db, out)
    assert sorted(str(p.relative_to(out)) for p in written) == _files(out)
    assert _files(out) == ALL_FILES
    for name in ("loss_curves", "throughput", "tpot"):
        assert (out / f"figures/{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert ET.parse(out / f"figures/{name}.svg").getroot().tag.endswith("svg")
    page = (out / "index.html").read_text()
    assert "3 training run(s), 3 inference run(s)" in page
    # throughput table: strategy, world size, runs, measured, mean, min, max, step time
    throughput = page[page.index("<h2>Throughput"):]
    # (tokens over time of the steady steps: 256 / 0.5 for both seeds)
    assert row_cells(throughput, "single")[:7] == ["single", "1", "2", "2", "512", "512", "512"]
    assert row_cells(throughput, "ep_dp")[:5] == ["ep_dp", "2", "1", "1", "512"]
    # TPOT table: ep_dp never ran at 2048 -> not measured, not 0
    tpot = page[page.index("Inference: time per output token"):]
    assert row_cells(tpot, "ep_dp") == ["ep_dp", "1.512", "not measured"]
    assert row_cells(tpot, "single") == ["single", "1.512", "3.048"]
    # loss table: ep_dp has no eval -> not measured
    loss = page[page.index("Loss curves"):]
    assert row_cells(loss, "ep_dp")[5:7] == ["not measured", "not measured"]
    # local runs have no SLURM job: not applicable rather than not measured
    assert "not applicable (local run)" in page
    # a study without ma_sep: the balancing section says so
    balance = page[page.index("Balancing and 8-bit gradients"):page.index("<h2>Runs</h2>")]
    assert balance.count("No rows: not measured") == 3  # variants, predictor, events
    # same database, same files
    before = {f: (out / f).read_bytes() for f in FILES if not f.endswith(".png")}
    render(db, out)
    assert {f: (out / f).read_bytes() for f in before} == before
    assert not [p for p in out.rglob(".*tmp*")]


def test_empty_and_partial_databases_render(tmp_path):
    (tmp_path / "runs").mkdir()
    db = tmp_path / "masep.duckdb"
    collect(tmp_path / "runs", db)
    render(db, tmp_path / "empty")
    # every figure is written (the workflow declares them); the page shows those with data only:
    # the cost model predicts from datasheet figures alone
    assert _files(tmp_path / "empty") == ALL_FILES
    page = (tmp_path / "empty" / "index.html").read_text()
    assert "figures/cost_model.svg" in page and "figures/performance.svg" not in page
    assert "Cost model error on measured runs (predicted vs measured step time): not measured here: " in page
    assert "0 training run(s), 0 inference run(s)" in page and "not measured" in page
    assert "training loss: not measured" in (tmp_path / "empty/figures/loss_curves.svg").read_text() or \
        "not measured" in page
    assert "No rows: not measured." in page[page.index("Inference: time per output token"):]
    # training only: the TPOT table stays empty (the page above shows an empty one as not measured)
    write_sample_run(tmp_path / "runs", "train", "single", "seed=0", steps=3)
    collect(tmp_path / "runs", db)
    with duckdb.connect(str(db), read_only=True) as con:
        assert tpot_figure(con)[1].rows == []


def test_missing_database(tmp_path):
    with pytest.raises(ReportError, match="no database at .*masep collect"):
        render(tmp_path / "none.duckdb", tmp_path / "out")
    out = subprocess.run([sys.executable, "-m", "masep.cli", "report", "--db", str(tmp_path / "none.duckdb"),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.startswith("masep report: --db: no database")


BENCH_V2 = Path(__file__).resolve().parent.parent / "bench" / "history" / "runs" / "bench" / "single" / "20261129T044725Z"


def _bench_section(page: str) -> str:
    return page[page.index("<h2>GPU benchmark (committed results)</h2>"):]


def test_bench_section_shows_committed_summaries(tmp_path):
    bench = tmp_path / "bench"
    shutil.copytree(BENCH_V2, bench / "bench" / "single" / BENCH_V2.name)
    (bench / "variants.json").write_text('{"command": "bench_variants", "train": {}}')  # not a run
    section = _bench_section(bench_section(bench))
    assert "<h3>bench/single/20261129T044725Z</h3>" in section
    assert "<p>NVIDIA H200, torch 2.11.0+cu130, 2026-11-29T04:47:25Z, commit None; peak 790 TFLOP/s" in section
    # run, GPUs, step ms, tok/s/GPU, tok/s all, vs 1 GPU, MFU, compute ms, comm, idle, peak GiB, mJ/token, TPOT...
    assert row_cells(section, "single") == ["single", "1", "1385", "47313", "47313", "1.00x", "40.0%", "1385", "none",
                                            "0", "107.6", "14.47", "46.43 (89.8x)", "46.37 (88.4x)", "45.92 (85.0x)",
                                            "46.45 (81.2x)"]
    assert "single-GPU MFU 40.0% (goal 45%)" in section
    assert "not measured" not in section
    assert bench_section(bench) == bench_section(bench)  # the same files, the same section


def test_bench_section_without_summaries(tmp_path):
    (tmp_path / "runs").mkdir()
    db = tmp_path / "masep.duckdb"
    collect(tmp_path / "runs", db)
    (tmp_path / "bench").mkdir()
    for bench in (None, tmp_path / "bench"):
        section = _bench_section(bench_section(bench))
        assert "not measured" in section and "<table>" not in section
    with pytest.raises(ReportError, match="--bench: .* is not a folder"):
        render(db, tmp_path / "out", bench=tmp_path / "nowhere")
    # the command's default: bench/runs of the current folder, where it exists; on the page
    shutil.copytree(BENCH_V2, tmp_path / "bench" / "runs" / "bench" / "single" / BENCH_V2.name)
    env = {**os.environ, "PYTHONPATH": str(BENCH_V2.parents[2]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-m", "masep.cli", "report", "--db", str(db), "--out", "cli-out"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert row_cells(_bench_section((tmp_path / "cli-out" / "index.html").read_text()), "single")[2] == "1385"


PEER = Path(__file__).resolve().parent.parent / "bench" / "peer-torchtitan-2026-12-01.json"


def test_peer_benchmark_is_loaded_and_shown(tmp_path):
    """The committed peer table (scripts/bench_peer.py) becomes peer_benchmark and a table of the
    Performance section, with the GPU, versions and command; a part the script could not run is a
    row with its reason."""
    import json

    (tmp_path / "runs").mkdir()
    failed = json.loads(PEER.read_text())
    failed["rows"] = [r for r in failed["rows"] if r["impl"] == "masep" or r["row"] == "moe_layer"]
    failed["errors"] = ["torchtitan train_step/decode: OutOfMemoryError: CUDA out of memory"]
    (tmp_path / "failed.json").write_text(json.dumps(failed))
    db = tmp_path / "masep.duckdb"
    counts = collect(tmp_path / "runs", db, [PEER, tmp_path / "failed.json"])
    assert counts["peer_benchmark"] == 6 + 5
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("SELECT workload, implementation, round(tokens_per_s), round(masep_over_peer, 2), "
                           "round(mfu, 3), reason, device, versions ->> 'torchtitan', command FROM peer_benchmark "
                           "WHERE source = ?", [str(PEER)]).fetchall()
        assert [r[:5] for r in rows] == [
            ("moe_layer", "masep", 459032, 1.09, 0.526), ("moe_layer", "torchtitan", 419229, 1.09, 0.481),
            ("train_step", "masep", 56842, 1.15, 0.48), ("train_step", "torchtitan", 49643, 1.15, 0.419),
            ("decode", "masep", 942, 12.88, None), ("decode", "torchtitan", 73, 12.88, None)]
        assert [r[5] is None for r in rows] == [True] * 4 + [False] * 2  # MFU of decode rows: why NULL
        assert {r[6:] for r in rows} == {("NVIDIA H200", "0.2.2", failed["command"])}
        failed_rows = con.execute("SELECT workload, implementation, tokens_per_s, masep_over_peer, reason "
                                  "FROM peer_benchmark WHERE source LIKE '%failed.json'").fetchall()
    assert failed_rows[-1] == ("torchtitan train_step/decode", None, None, None,
                               "not measured: OutOfMemoryError: CUDA out of memory")
    assert failed_rows[2][3] is None  # masep's train step without the peer's: no ratio
    perf, _ = render_section(db, "performance", tmp_path / "out")
    assert "Beside a peer on one GPU" in perf and "NVIDIA H200, torch 2.11.0+cu130, CUDA 13.0, torchtitan 0.2.2" in perf
    assert html_escape(failed["command"]) in perf
    assert row_cells(perf[perf.index(str(PEER)):], "train_step")[:7] == [
        "train_step", "masep", "56842", "1153", "48.02", "122.8", "1.145"]
    assert row_cells(perf, "torchtitan train_step/decode")[-1] == "not measured: OutOfMemoryError: CUDA out of memory"
    # the command loads bench/peer-*.json of the current folder; `--peer` alone loads none
    (tmp_path / "bench").mkdir()
    shutil.copy(PEER, tmp_path / "bench" / PEER.name)
    for extra, n in (([], 6), (["--peer"], 0)):
        out = subprocess.run([sys.executable, "-m", "masep.cli", "collect", "--runs", "runs", "--db", "cli.duckdb",
                              *extra], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and f"peer_benchmark={n}" in out.stdout, out.stderr
    assert "No peer benchmark loaded: not measured" in render_section(tmp_path / "cli.duckdb", "performance",
                                                                      tmp_path / "none")[0]
    out = subprocess.run([sys.executable, "-m", "masep.cli", "collect", "--runs", "runs", "--db", "cli.duckdb",
                          "--peer", "bench/nope.json"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and out.stderr == "masep collect: --peer: bench/nope.json is not a file " \
                                                 "(scripts/bench_peer.py's STEM.json)\n"
