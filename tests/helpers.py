"""Shared by several test modules: made-up run folders and C4 files, configs, and the rank entries
the launch tests submit. Found through the tests/ entry on sys.path (tests/conftest.py)."""
from __future__ import annotations

import gzip
import json
import random
import re
import sys
import time
from pathlib import Path

import cloudpickle
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import submitit

from masep.config import load_config
from masep.data.c4 import shard_name
from masep.launch import RankEntry
from masep.runtime.distributed import init_distributed, shutdown_distributed

# Task processes cannot import this module: ship the rank entries below by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SMALL = ["data.seq_len=32", "train.global_batch=4", "train.micro_batch=2", "model.hidden=32", "model.layers=2",
         "model.heads=2", "model.experts=8", "model.expert_hidden=32", "parallel.timeout_s=60"]
SMALL_VOCAB = SMALL + ["model.vocab_size=1000", "model.vocab_pad_multiple=128"]  # random-token runs


def query(db: Path, sql: str, *params) -> list[tuple]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()

# ------------------------------------------------------------------ run folders


STEP_COLUMNS = ["run_id", "step", "rank", "tokens", "loss", "lb_loss", "z_loss", "lr", "grad_norm",
                "step_time_s", "tokens_per_s", "dropped_tokens", "peak_mem_bytes", "compute_s",
                "comm_attn_allreduce_s", "comm_moe_dispatch_s", "comm_grad_sync_s",
                "comm_p2p_s", "idle_s"]


def write_sample_run(root: Path, experiment: str, strategy: str, key: str, *, world_size: int = 1,
                     steps: int = 0, seed: int = 0, contexts=(), evals=(), extra_kinds=(),
                     complete: bool = True, drop_step_columns=()) -> Path:
    """A run folder with made-up per-rank Parquet rows; run.json last (only when `complete`)."""
    folder = root / experiment / strategy / key
    folder.mkdir(parents=True)
    run_id = f"{experiment}-{strategy}-{key}"
    for rank in range(world_size):
        if steps:
            rows = {c: [] for c in STEP_COLUMNS}
            for s in range(1, steps + 1):
                row = dict(run_id=run_id, step=s, rank=rank, tokens=256, loss=10.0 - s + rank * 0.0,
                           lb_loss=0.01, z_loss=0.001, lr=1e-3, grad_norm=1.0,
                           step_time_s=2.0 if s == 1 else 0.5, tokens_per_s=128.0 if s == 1 else 512.0 + seed,
                           dropped_tokens=s, peak_mem_bytes=1000 + rank, compute_s=0.4,
                           comm_attn_allreduce_s=None, comm_moe_dispatch_s=None,
                           comm_grad_sync_s=0.05 if world_size > 1 else None,
                           comm_p2p_s=None, idle_s=0.05)
                for c in STEP_COLUMNS:
                    rows[c].append(row[c])
            table = pa.table({c: rows[c] for c in STEP_COLUMNS if c not in drop_step_columns})
            pq.write_table(table, folder / f"steps-rank{rank}.parquet")
            pq.write_table(pa.table({"run_id": [run_id] * 4, "step": [steps] * 4, "layer": [0, 0, 1, 1],
                                     "expert": [0, 1, 0, 1], "tokens": [10, 20, 15, 15]}),
                           folder / f"experts-rank{rank}.parquet")
        if contexts:
            pq.write_table(pa.table({
                "run_id": [run_id] * len(contexts), "rank": [rank] * len(contexts),
                "context_len": list(contexts), "batch": [1] * len(contexts),
                "new_tokens": [16] * len(contexts),
                "prefill_ms": [c / 100 for c in contexts], "tpot_ms": [1.0 + c / 1000 for c in contexts],
                "tokens_per_s": [1000 / (1.0 + c / 1000) for c in contexts]}),
                folder / f"inference-rank{rank}.parquet")
        for kind in extra_kinds:
            pq.write_table(pa.table({"run_id": [run_id], "rank": [rank], "recovery_s": [1.5]}),
                           folder / f"{kind}-rank{rank}.parquet")
    if evals:
        pq.write_table(pa.table({"run_id": [run_id] * len(evals), "step": [s for s, _ in evals],
                                 "val_loss": [v for _, v in evals],
                                 "val_ppl": [2.718281828 ** v for _, v in evals]}),
                       folder / "eval-rank0.parquet")
    if complete:
        (folder / "run.json").write_text(json.dumps({
            "run_id": run_id, "experiment": experiment, "strategy": strategy, "seed": seed,
            "world_size": world_size, "config": {"model": {"hidden": 64}, "parallel": {"strategy": strategy}},
            "versions": {"torch": "2.13.0"}, "git_commit": "0123abc", "host": "testhost",
            "hardware": {"gpus": 0}, "status": "completed", "started_at": "2025-01-01T00:00:00+00:00",
            "ended_at": 1735689630.0, "slurm_job_id": None, "layout": {"ranks": list(range(world_size))}}))
    return folder


def write_run_from_rows(root: Path, strategy: str, key: str, world: int, kinds: dict[str, list[dict]],
                        extra: dict | None = None, experiment: str = "train", seed: int = 0) -> str:
    """A completed run folder holding the given rows, one Parquet file per kind and rank."""
    folder = root / experiment / strategy / key
    folder.mkdir(parents=True)
    run_id = f"{experiment}/{strategy}/{key}"
    for kind, rows in kinds.items():
        by_rank: dict[int, list[dict]] = {}
        for r in rows:
            by_rank.setdefault(r.get("rank", 0), []).append({"run_id": run_id, **r})
        for rank, rs in by_rank.items():
            pq.write_table(pa.Table.from_pylist(rs), folder / f"{kind}-rank{rank}.parquet")
    (folder / "run.json").write_text(json.dumps({
        "run_id": run_id, "experiment": experiment, "strategy": strategy, "seed": seed, "world_size": world,
        "config": {"model": {"lb_coef": 0.01, "z_coef": 0.001}, "train": {"seed": seed}}, "status": "completed",
        **(extra or {})}))
    return run_id


def train_steps(world: int, n: int, tokens: int, step_time: float, comm: dict | None = None, compute=None) -> list:
    return [{"step": s, "rank": r, "tokens": tokens, "loss": 5.0 - 0.1 * s, "lb_loss": 1.1, "z_loss": 2.0,
             "step_time_s": step_time, "tokens_per_s": tokens / step_time, "dropped_tokens": 3,
             "compute_s": (compute or {}).get(r, step_time / 2), "idle_s": 0.0,
             **{f"comm_{k}_s": (comm or {}).get(k, 0.0) for k in
                ("attn_allreduce", "moe_dispatch", "grad_sync", "p2p")}}
            for s in range(n) for r in range(world)]


def windows(world: int, energy_j: list, tokens: int, util: float) -> list:
    return [{"rank": r, "host": f"h{r // 2}", "segment_start_s": 1.0, "steps": 9, "tokens": tokens, "window_s": 10.0,
             "samples": 100, "gpu_util_mean": util + r, "mem_util_mean": 30.0, "power_mean_w": 400.0,
             "gpu_energy_j": energy_j[r], "cpu_energy_j": None, "gpu_reason": None, "energy_reason": None,
             "cpu_energy_reason": "no RAPL: test"} for r in range(world)]


GPU = {"device": "cuda:0"}

# ------------------------------------------------------------------ C4 files


WORDS = ("the of and to in is was for on that with as by at from his her an which were are "
         "river stone window garden engine letter winter harbour music lantern orbit").split()


def make_docs(n: int, seed: int = 0, max_words: int = 400) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.choice([1, 5, 30, 120, max_words]))]
        text = " ".join(words).capitalize() + ".\nSecond line of document %d." % i
        docs.append({"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.org/{seed}/{i}"})
    return docs


def write_gz(path: Path, lines: list) -> Path:
    """JSON lines (dicts are dumped, str/bytes written as they are) into a C4-style .json.gz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = b"".join((json.dumps(x).encode() if isinstance(x, dict) else
                     x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines)
    path.write_bytes(gzip.compress(body, mtime=0))
    return path


def local_cfg(tmp_path: Path, *overrides: str):
    return load_config("tiny", ["data.source=local", f"data.local_dir={tmp_path / 'c4'}",
                                f"data.tokens_dir={tmp_path / 'tokens'}", "data.seq_len=32", *overrides])


def c4_file(tmp_path: Path, index: int = 0) -> Path:
    return tmp_path / "c4" / shard_name(index)


def write_c4(path: Path, n_docs: int = 120) -> None:
    rng = random.Random(0)
    words = "the of and river stone window garden engine letter winter harbour music lantern orbit".split()
    docs = [{"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 200))), "url": f"u{i}",
             "timestamp": ""} for i in range(n_docs)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(b"".join(json.dumps(d).encode() + b"\n" for d in docs), mtime=0))


def flip_middle_byte(path: Path) -> None:
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0xFF
    path.write_bytes(bytes(b))

# ------------------------------------------------------------------ report pages


def render_section(db: Path, key: str, out: Path) -> tuple[str, list[Path]]:
    """One section of the report as `render` writes it (its HTML, and its figures under
    `out/figures`): a test of one section need not draw every figure of the page."""
    from masep.report.sections import SECTIONS

    (out / "figures").mkdir(parents=True, exist_ok=True)
    with duckdb.connect(str(db), read_only=True) as con:
        return SECTIONS[key].render(con, out / "figures")


def row_cells(html_text: str, first_cell: str) -> list[str]:
    """The cells of the first table row whose first cell is `first_cell`."""
    for row in re.findall(r"<tr>(.*?)</tr>", html_text):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r}")

# ------------------------------------------------------------------ rank entries


class AllReduceRanks(RankEntry):
    """Each rank contributes its rank id; every rank must see the sum."""

    def __call__(self):
        import torch
        import torch.distributed as dist

        info = init_distributed(timeout_s=30)
        t = torch.tensor([float(info.rank)])
        dist.all_reduce(t)
        shutdown_distributed()
        return {"rank": info.rank, "world": info.world_size, "sum": t.item(),
                "job_id": info.job_id, "slurm_job_id": info.slurm_job_id, "device": str(info.device)}


class FailOnRank(RankEntry):
    def __init__(self, bad_rank: int):
        self.bad_rank = bad_rank

    def __call__(self):
        rank = submitit.JobEnvironment().global_rank
        if rank == self.bad_rank:
            raise ValueError(f"boom from rank {rank}")
        return rank


class Sleep(RankEntry):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def __call__(self):
        time.sleep(self.seconds)
        return "slept"
