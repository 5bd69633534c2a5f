#!/usr/bin/env python
"""How the costs that grow with shards, ranks and runs scale, without a cluster.

    python scripts/bench_scale.py --shards 64 --shard-mb 300 --runs 50 --steps 50000 --ranks 16  # paper shape
    python scripts/bench_scale.py                                                               # quick look

1. Token shards: `--shards` synthetic shards of `--shard-mb` MB of uint16 tokens (documents of
   50-1500 tokens) with manifests as `masep tokenize` writes them.
2. Per-rank start-up, config to first batch (`shard_dirs` as a rank calls it, the dataset,
   batch 0), with 1, 4 and 16 ranks starting at once (processes), at N and 2N shards; and the
   job's own check of the shards (sizes and sampled fingerprints), once per job.
3. Loader tokens/s per rank against what one H200 consumes (tokens/s per GPU of the committed
   GPU benchmark run `--h200`, measured in the same repository).
4. `masep collect`, the heaviest views and `masep report` on synthetic run folders of `--runs`
   runs x `--steps` steps x `--ranks` ranks (step rows, expert counts of rank 0, one energy
   window per rank), and at twice the runs; with the database's size and peak memory.
Every timing is measured here and now; ratios compare runs of this script on the same machine.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from masep.config import load_config  # noqa: E402
from masep.data.batches import TokenDataset  # noqa: E402  (imported once, before ranks fork)
from masep.data.shards import shard_dirs  # noqa: E402
from masep.telemetry.writer import file_manifest  # noqa: E402
from masep.data.shards import FORMAT, MANIFEST, file_meta, sha256_file, shard_dir, shard_params, split_files  # noqa: E402


def data_sets(work: Path, n_shards: int, seq_len: int) -> list[str]:
    return ["data.source=local", f"data.local_dir={work / 'c4'}", f"data.tokens_dir={work / 'tokens'}",
            f"data.shards=[{','.join(map(str, range(n_shards)))}]", f"data.seq_len={seq_len}"]


def write_shards(work: Path, n_shards: int, shard_mb: float) -> None:
    data = load_config("tiny", data_sets(work, n_shards, 2048)).data
    rng = np.random.default_rng(0)
    for index in range(n_shards):
        directory = shard_dir(data, index)
        if (directory / MANIFEST).exists():
            continue
        directory.mkdir(parents=True, exist_ok=True)
        files = {}
        for split, share in (("train", 0.9), ("val", 0.1)):
            n_tokens = max(int(shard_mb * 1e6 * share / 2), 2)
            lengths = rng.integers(50, 1500, n_tokens // 50 + 1)
            lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), n_tokens)) + 1]
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            bin_name, idx_name = split_files(split)
            rng.integers(0, 50257, int(offsets[-1]), dtype=np.uint16).tofile(directory / bin_name)
            np.save(directory / idx_name, offsets)
            for name in (bin_name, idx_name):
                files[name] = file_meta(directory / name, sha256_file(directory / name))
        (directory / MANIFEST).write_text(json.dumps({"format": FORMAT, "params": shard_params(data, index),
                                                      "files": files}))


def _start_rank(args) -> float:
    """Seconds from the config to the first batch, in a process of its own."""
    sets, global_batch = args
    t0 = time.perf_counter()
    cfg = load_config("tiny", sets)
    train = TokenDataset(shard_dirs(cfg, contents=False), "train", cfg.data.seq_len, cfg.data.packing)
    train.batch(0, global_batch, cfg.train.seed)
    return time.perf_counter() - t0


def job_check(work: Path, n_shards: int) -> float:
    """Seconds of the job's check of every shard (sizes and sampled fingerprints)."""
    cfg = load_config("tiny", data_sets(work, n_shards, 2048))
    t0 = time.perf_counter()
    shard_dirs(cfg)
    return time.perf_counter() - t0


def startup(work: Path, n_shards: int, ranks: int) -> float:
    """Slowest rank's start-up with `ranks` ranks starting at once."""
    with mp.get_context("fork").Pool(ranks) as pool:
        return max(pool.map(_start_rank, [(data_sets(work, n_shards, 2048), 16)] * ranks))


def loader_tokens_per_s(work: Path, n_shards: int, batch: int, steps: int = 20) -> float:
    cfg = load_config("tiny", data_sets(work, n_shards, 2048))
    train = TokenDataset(shard_dirs(cfg), "train", cfg.data.seq_len, cfg.data.packing)
    train.batch(0, batch, 0)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        train.batch(step, batch, 0)
    return steps * batch * cfg.data.seq_len / (time.perf_counter() - t0)


STEP_FLOATS = ("loss", "lb_loss", "z_loss", "lr", "grad_norm", "step_time_s", "tokens_per_s", "compute_s", "idle_s",
               "comm_attn_allreduce_s", "comm_moe_dispatch_s", "comm_grad_sync_s", "comm_param_bcast_s",
               "comm_p2p_s", "t_end_unix_s")


def write_runs(root: Path, runs: int, steps: int, ranks: int, layers: int = 4, experts: int = 16) -> None:
    rng = np.random.default_rng(1)
    strategies = ("tp", "pp", "tp_pp", "ep_dp", "ma_sep")
    for r in range(runs):
        strategy, seed = strategies[r % len(strategies)], r // len(strategies)
        folder = root / "train" / strategy / f"seed={seed}"
        if (folder / "run.json").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        run_id = f"train/{strategy}/seed={seed}"
        step = np.arange(steps, dtype=np.int64)
        for rank in range(ranks):
            cols = {"run_id": pa.array([run_id] * steps), "step": step, "rank": np.full(steps, rank),
                    "tokens": np.full(steps, 2 << 20), "dropped_tokens": rng.integers(0, 100, steps),
                    "peak_mem_bytes": np.full(steps, 80 << 30), "batch_crc32": rng.integers(0, 2 ** 32, steps)}
            cols.update({c: rng.random(steps) for c in STEP_FLOATS})
            pq.write_table(pa.table(cols), folder / f"steps-rank{rank}.parquet")
            pq.write_table(pa.table({
                "run_id": [run_id], "rank": [rank], "host": [f"h{rank // 8}"], "segment_start_s": [0.0],
                "steps": [steps], "tokens": [steps * (2 << 20)], "window_s": [steps * 1.0], "samples": [steps * 10],
                "gpu_util_mean": [80.0], "mem_util_mean": [30.0], "power_mean_w": [500.0],
                "gpu_energy_j": [steps * 500.0], "cpu_energy_j": [None], "gpu_reason": [None],
                "energy_reason": [None], "cpu_energy_reason": ["no RAPL"]}), folder / f"energy_window-rank{rank}.parquet")
        n = steps * layers * experts
        pq.write_table(pa.table({"run_id": pa.array([run_id] * n), "step": np.repeat(step, layers * experts),
                                 "layer": np.tile(np.repeat(np.arange(layers), experts), steps),
                                 "expert": np.tile(np.arange(experts), steps * layers),
                                 "tokens": rng.integers(0, 1 << 18, n)}), folder / "experts-rank0.parquet")
        (folder / "run.json").write_text(json.dumps({
            "run_id": run_id, "experiment": "train", "strategy": strategy, "seed": seed, "world_size": ranks,
            "config": {"model": {"lb_coef": 0.01, "z_coef": 0.001}, "train": {"seed": seed}},
            "status": "completed", "device": "cuda:0", "started_at": "2026-01-01T00:00:00+00:00",
            "ended_at": "2026-01-02T00:00:00+00:00", "files": file_manifest(folder)}))


HEAVY_VIEWS = ("run_summary", "table1_performance", "table2_communication", "run_metrics", "load_balance")


def timed(fn, *args) -> tuple[float, float]:
    """Wall and CPU seconds of fn(*args) (CPU of every thread of this process: DuckDB's too)."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - t0, time.process_time() - c0


def results(work: Path, runs: int, steps: int, ranks: int) -> dict:
    from masep.report.render import render
    from masep.results.collect import collect

    import duckdb

    root = work / "runs"
    write_runs(root, runs, steps, ranks)
    db = work / f"masep-{runs}.duckdb"
    db.unlink(missing_ok=True)
    folders = sorted(str(p.parent) for p in root.rglob("run.json"))

    def scan() -> None:  # the reference: DuckDB reading every value once (hash: max could use the statistics)
        with duckdb.connect() as con:
            for kind in ("steps", "experts"):
                con.execute("SELECT sum(hash(COLUMNS(*))) FROM read_parquet($files, union_by_name = true)",
                            {"files": [f"{d}/{kind}-rank*.parquet" for d in folders]}).fetchall()

    def views() -> None:
        with duckdb.connect(str(db), read_only=True) as con:
            for view in HEAVY_VIEWS:
                con.execute(f"SELECT count(*) FROM (SELECT * FROM {view})").fetchall()

    out = {"scan": timed(scan), "collect": timed(collect, root, db), "views": timed(views),
           "report": timed(render, db, work / f"report-{runs}")}
    # a reused --work folder may hold more runs than asked for: collect reads them all
    return {**out, "db_mb": db.stat().st_size / 1e6, "runs": len(folders), "step_rows": len(folders) * steps * ranks}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=8, help="N: start-up is measured at N and 2N shards")
    p.add_argument("--shard-mb", type=float, default=16.0)
    p.add_argument("--runs", type=int, default=2, help="R: collect and report are measured at R and 2R runs")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--ranks", type=int, default=16)
    p.add_argument("--h200", type=Path, default=REPO / "bench" / "runs" / "bench" / "single" / "20261129T101631Z",
                   help="a GPU benchmark run folder (python -m masep.bench): its median tokens/s per GPU")
    p.add_argument("--results-only", action="store_true", help="only part 4 (collect, views, report)")
    p.add_argument("--work", type=Path, default=None, help="folder for the synthetic data (default: a temporary one)")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="masep-scale-"))
    try:
        if not args.results_only:
            t0 = time.perf_counter()
            write_shards(work, 2 * args.shards, args.shard_mb)
            print(f"wrote {2 * args.shards} shards of {args.shard_mb:g} MB in {time.perf_counter() - t0:.1f} s "
                  f"({work})")
            print("\nper-rank start-up, config to first batch (slowest rank, s)")
            print("shards | " + " | ".join(f"{r} ranks" for r in (1, 4, 16)) + " | job's shard check")
            for n in (args.shards, 2 * args.shards):
                print(f"{n} | " + " | ".join(f"{startup(work, n, r):.2f}" for r in (1, 4, 16)) +
                      f" | {job_check(work, n):.2f}")

            need = statistics.median(pq.read_table(args.h200 / "steps-rank0.parquet")["tokens_per_s"].to_pylist()) \
                / json.loads((args.h200 / "run.json").read_text())["world_size"]
            have = statistics.median(loader_tokens_per_s(work, args.shards, 16) for _ in range(3))
            print(f"\nloader: {have:,.0f} tokens/s per rank (16 x 2048-token sequences per batch); one H200 consumes "
                  f"{need:,.0f} tokens/s ({args.h200}): {have / need:.1f}x")

        print(f"\ncollect / views / report, {args.ranks} ranks x {args.steps} steps per run; wall s (CPU s of all "
              "threads); scan = DuckDB reading every column of the steps and experts files once, the reference")
        print("runs | step rows | scan | collect | views | report | collect / scan (CPU) | db MB")
        for runs in (args.runs, 2 * args.runs):
            r = results(work, runs, args.steps, args.ranks)
            cells = " | ".join(f"{r[k][0]:.1f} ({r[k][1]:.1f})" for k in ("scan", "collect", "views", "report"))
            print(f"{r['runs']} | {r['step_rows']:,} | {cells} | {r['collect'][1] / r['scan'][1]:.1f} | {r['db_mb']:.0f}")
        print(f"\npeak memory of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
