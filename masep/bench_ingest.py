"""`masep bench-import SUMMARY.json [...]`: GPU benchmark summaries (`masep/bench.py`) as run folders.

Each summary becomes `<runs>/bench/<label>/<stamp>/` (stamp: the summary's UTC date, e.g.
20261129T071808Z), so its run_id is `bench/<label>/<stamp>` and `masep collect` loads it like any
run:

- `steps-rank<R>.parquet`: the summary's per-rank step rows (the timed steps; warm-up steps are
  not in a summary);
- `inference-rank0.parquet`: one row per decode context (TPOT is the bench's median), with the
  HBM bound beside it;
- `energy_window-rank<R>.parquet`: one window per rank, the timed training steps; the energy is
  NVML's counter over that window, or NULL with the reason;
- `run.json` (last): experiment `bench`, the resolved config and layout, the FLOP record the
  summary carries (rebuilt from the config and GPU name for summaries older than it), the source
  file, and the whole summary without its step rows under `bench`.

Every summary is read and checked before anything is written: a file that cannot be imported is
named in one line and nothing is written. A JSON file with none of a summary's keys (e.g. the
A/B results of scripts/bench_variants.py beside the summaries in bench/) is skipped with a note.
A run folder is built in a hidden sibling folder and renamed into place, so a re-import
replaces the previous folder whole.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from masep.bench_table import SUMMARY_KEYS, is_summary
from masep.config import Config, ConfigError, config_from_dict
from masep.parallel.layout import make_layout
from masep.telemetry.mfu import flops_record
from masep.telemetry.nvml import WINDOW_SCHEMA
from masep.telemetry.writer import atomic_write_json

EXPERIMENT = "bench"
LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$")
REQUIRED = {"label": str, "strategy": str, "world_size": int, "config": dict, "device": str, "date": str,
            "steps": list}
NO_RANK_ENERGY = "per-rank energy not recorded by this benchmark version"
# Column types of step rows as the steps table declares them (masep/results/sql/00_schema.sql);
# other columns keep the type pyarrow infers.
INT_COLUMNS = {"step", "rank", "tokens", "dropped_tokens", "peak_mem_bytes"}
FLOAT_COLUMNS = {"loss", "lb_loss", "z_loss", "lr", "grad_norm", "step_time_s", "tokens_per_s", "compute_s",
                 "idle_s", "t_end_unix_s", "comm_attn_allreduce_s", "comm_moe_dispatch_s", "comm_grad_sync_s",
                 "comm_param_bcast_s", "comm_p2p_s"}


class BenchImportError(RuntimeError):
    pass


class NotASummary(BenchImportError):
    """A JSON file of another kind (it has none of a summary's keys): skipped, not an error."""


def _fail(path: Path, msg: str) -> BenchImportError:
    return BenchImportError(f"{path}: {msg}")


def stamp_of(date: str) -> str:
    """ISO date (the summary's `date`) -> UTC stamp 20261129T071808Z."""
    dt = datetime.fromisoformat(date.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def load_summary(path: Path) -> tuple[dict, bytes]:
    """The summary of `path`, checked for what the import needs, and the file's bytes."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise _fail(path, f"cannot read: {e.strerror or e}") from e
    try:
        s = json.loads(raw)
    except json.JSONDecodeError as e:
        raise _fail(path, f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    except UnicodeDecodeError as e:
        raise _fail(path, f"not valid JSON (not UTF-8 text: {e.reason} at byte {e.start})") from e
    if not isinstance(s, dict):
        raise _fail(path, "not a benchmark summary (expected a JSON object)")
    if not is_summary(s):
        raise NotASummary(f"{path}: not a benchmark summary (none of {', '.join(SUMMARY_KEYS)}): skipped")
    missing = [k for k in REQUIRED if k not in s]
    if missing:
        raise _fail(path, f"not a benchmark summary: missing {', '.join(missing)}")
    for key, tp in REQUIRED.items():
        if not isinstance(s[key], tp) or (tp is int and isinstance(s[key], bool)):
            raise _fail(path, f"{key}: expected {tp.__name__}, got {type(s[key]).__name__}")
    if not LABEL.match(s["label"]) or s["label"] in (".", ".."):
        raise _fail(path, f"label {s['label']!r} cannot name a folder")
    if s["world_size"] < 1:
        raise _fail(path, f"world_size: {s['world_size']} is not a number of ranks")
    try:
        stamp_of(s["date"])
    except ValueError as e:
        raise _fail(path, f"date {s['date']!r} is not an ISO date") from e
    if not s["steps"]:
        raise _fail(path, "steps: no step rows")
    for i, row in enumerate(s["steps"]):
        if not isinstance(row, dict) or not isinstance(row.get("rank"), int) or not isinstance(row.get("step"), int):
            raise _fail(path, f"steps[{i}]: expected a row with integer step and rank")
        if not 0 <= row["rank"] < s["world_size"]:
            raise _fail(path, f"steps[{i}]: rank {row['rank']} outside world_size {s['world_size']}")
    decode = s.get("decode") or []
    if not isinstance(decode, list) or not all(
            isinstance(d, dict) and all(k in d for k in ("context_len", "batch", "prefill_ms", "tpot_ms"))
            for d in decode):
        raise _fail(path, "decode: expected rows with context_len, batch, prefill_ms and tpot_ms")
    for key in ("energy_j_by_rank", "energy_reason_by_rank", "peak_mem_bytes_by_rank"):
        if s.get(key) is not None and not isinstance(s[key], dict):
            raise _fail(path, f"{key}: expected an object keyed by rank")
    return s, raw


def _by_rank(d: Optional[dict], rank: int) -> Any:
    """A per-rank value of a summary (JSON keys are strings)."""
    if not d:
        return None
    return d.get(str(rank), d.get(rank))


def _step_table(rows: list[dict]) -> pa.Table:
    """Step rows of one rank, typed as the steps table declares its columns."""
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]

    def cell(column: str, v: Any) -> Any:
        if column in FLOAT_COLUMNS and isinstance(v, int) and not isinstance(v, bool):
            return float(v)
        if column in INT_COLUMNS and isinstance(v, float) and v.is_integer():
            return int(v)
        return v

    data = {c: [cell(c, r.get(c)) for r in rows] for c in columns}
    fields = [pa.field(c, pa.int64() if c in INT_COLUMNS else pa.float64() if c in FLOAT_COLUMNS
                       else pa.array(data[c]).type) for c in columns]
    return pa.Table.from_pydict(data, schema=pa.schema(fields))


def _measurement_tables(s: dict, cfg: Config, run_id: str, steps: list[dict],
                        on_gpu: bool) -> tuple[pa.Table, list[pa.Table]]:
    """inference-rank0 rows (one per decode context) and one energy window per rank."""
    world, new_tokens = s["world_size"], cfg.infer.new_tokens
    inference = [{
        "run_id": run_id, "rank": 0, "context_len": int(d["context_len"]), "batch": int(d["batch"]),
        "new_tokens": new_tokens, "prefill_ms": float(d["prefill_ms"]), "tpot_ms": float(d["tpot_ms"]),
        "tokens_per_s": int(d["batch"]) * 1000.0 / d["tpot_ms"] if d["tpot_ms"] else None,
        "tpot_mean_ms": d.get("tpot_mean_ms"), "hbm_bound_ms": d.get("hbm_bound_ms"),
        "tpot_over_bound": d.get("tpot_over_bound"),
    } for d in (s.get("decode") or [])]

    by_rank = s.get("energy_j_by_rank")
    windows = []
    for rank in range(world):
        rows = [r for r in steps if r["rank"] == rank]
        if isinstance(by_rank, dict):
            joules = _by_rank(by_rank, rank)
            reason = _by_rank(s.get("energy_reason_by_rank"), rank) or s.get("energy_reason")
        elif world == 1:
            joules, reason = s.get("energy_j"), s.get("energy_reason")
        else:
            joules, reason = None, NO_RANK_ENERGY
        if joules is not None:
            reason = None
        elif not reason:
            reason = "not measured"
        wall = s.get("timed_wall_s")
        windows.append({
            "run_id": run_id, "rank": rank, "host": None, "segment_start_s": None, "warmup_steps": None,
            "first_step": min((r["step"] for r in rows), default=None),
            "last_step": max((r["step"] for r in rows), default=None),
            "steps": s.get("timed_steps") if s.get("timed_steps") is not None else len(rows),
            "tokens": s.get("timed_tokens") if s.get("timed_tokens") is not None
            else sum(int(r.get("tokens") or 0) for r in rows),
            "window_start_s": None, "window_end_s": None, "window_s": wall, "samples": None,
            "gpu_util_mean": None, "mem_util_mean": None,
            # the counter's energy over the window's wall time is the window's mean power
            "power_mean_w": joules / wall if joules is not None and wall else None,
            "gpu_energy_j": joules, "cpu_energy_j": None,
            "gpu_reason": "utilization not sampled by the GPU benchmark" if on_gpu else "no GPU",
            "energy_reason": reason, "cpu_energy_reason": "not measured by the GPU benchmark",
        })
    return pa.Table.from_pylist(inference), [pa.Table.from_pylist([w], schema=WINDOW_SCHEMA) for w in windows]


def plan(path: Path, runs_root: Path) -> dict:
    """Everything the run folder of one summary holds, computed before anything is written."""
    path = Path(path)
    s, raw = load_summary(path)
    try:
        cfg = config_from_dict(s["config"])
        layout = make_layout(cfg).to_dict()
    except (ConfigError, TypeError, ValueError, KeyError, AttributeError) as e:
        raise _fail(path, f"config: {e}") from e
    world = s["world_size"]
    if cfg.parallel.world_size != world:
        raise _fail(path, f"config parallel.world_size {cfg.parallel.world_size} != world_size {world}")
    stamp = stamp_of(s["date"])
    folder = Path(runs_root) / EXPERIMENT / s["label"] / stamp
    run_id = f"{EXPERIMENT}/{s['label']}/{stamp}"
    on_gpu = s["device"].lower() != "cpu"

    flops = s.get("flops")
    if not isinstance(flops, dict):  # summaries before the FLOP record: rebuilt from config and GPU name
        try:
            flops = flops_record(cfg, "cuda" if on_gpu else "cpu", gpu_name=s["device"])
        except (ConfigError, ValueError) as e:
            raise _fail(path, f"flops: {e}") from e

    steps = sorted(({"run_id": run_id, **r} for r in s["steps"]), key=lambda r: (r["rank"], r["step"]))
    ranks = sorted({r["rank"] for r in steps})
    try:
        step_tables = {rank: _step_table([r for r in steps if r["rank"] == rank]) for rank in ranks}
    except (pa.ArrowException, TypeError, ValueError) as e:
        raise _fail(path, f"steps: {e}") from e

    try:
        inference, windows = _measurement_tables(s, cfg, run_id, steps, on_gpu)
    except (pa.ArrowException, TypeError, ValueError, KeyError) as e:
        raise _fail(path, f"decode or energy figures: {e}") from e

    run = {
        "run_id": run_id, "experiment": EXPERIMENT, "strategy": s["strategy"], "seed": cfg.train.seed,
        "world_size": world, "config": s["config"], "layout": layout,
        "versions": s["versions"] if isinstance(s.get("versions"), dict) else {"torch": s.get("torch")},
        "git_commit": s.get("git_commit"), "host": None,
        "hardware": {"gpus": [s["device"]] * world if on_gpu else []},
        "device": "cuda" if on_gpu else "cpu", "status": "completed",
        "started_at": s["date"], "ended_at": s["date"], "slurm_job_id": None, "job_id": None,
        "flops": flops, "source_file": str(path), "source_sha256": hashlib.sha256(raw).hexdigest(),
        "bench": {k: v for k, v in s.items() if k != "steps"},
    }
    return {"path": path, "folder": folder, "run_id": run_id, "run": run, "steps": step_tables,
            "inference": inference, "windows": windows}


def _write(p: dict) -> None:
    """The run folder of one plan: built beside its place, then renamed over it."""
    folder: Path = p["folder"]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for rank, table in p["steps"].items():
            pq.write_table(table, tmp / f"steps-rank{rank}.parquet")
        if p["inference"].num_rows:
            pq.write_table(p["inference"], tmp / "inference-rank0.parquet")
        for rank, table in enumerate(p["windows"]):
            pq.write_table(table, tmp / f"energy_window-rank{rank}.parquet")
        atomic_write_json(tmp / "run.json", p["run"])  # last: the folder is complete
        if folder.exists():
            os.rename(folder, old)
            try:
                os.rename(tmp, folder)
            except BaseException:
                os.rename(old, folder)
                raise
            (old / "run.json").unlink(missing_ok=True)  # the old copy is no run any more
        else:
            os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def import_summaries(paths: list[str | Path], runs_root: str | Path,
                     skipped: Optional[list[str]] = None) -> list[tuple[Path, Path]]:
    """Import every summary, or none: [(summary, run folder)]; BenchImportError lists the bad
    files. JSON files of another kind are left out, each with a line in `skipped`."""
    plans, errors = [], []
    for path in paths:
        try:
            plans.append(plan(Path(path), Path(runs_root)))
        except NotASummary as e:
            if skipped is not None:
                skipped.append(str(e))
        except BenchImportError as e:
            errors.append(str(e))
    seen: dict[Path, Path] = {}
    for p in plans:
        if p["folder"] in seen:
            errors.append(f"{p['path']}: same label and date as {seen[p['folder']]} (run {p['run_id']})")
        seen.setdefault(p["folder"], p["path"])
    if errors:
        raise BenchImportError("\n".join(errors))
    done = []
    for p in plans:
        try:
            _write(p)
        except OSError as e:
            raise _fail(p["path"], f"cannot write {p['folder']}: {e.strerror or e}") from e
        done.append((p["path"], p["folder"]))
    return done


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("summaries", nargs="+", metavar="SUMMARY.json",
                   help="benchmark summaries written by `python -m masep.bench` (e.g. bench/*.json)")
    # Its own root by default: the views average runs by strategy and world size, and a GPU
    # benchmark averaged with a study's (CPU or other-preset) runs would mean nothing.
    p.add_argument("--runs", default="results/bench-runs", help="root of the run folders (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    skipped: list[str] = []
    try:
        done = import_summaries(args.summaries, args.runs, skipped)
    except BenchImportError as e:
        for line in str(e).splitlines():
            print(f"masep bench-import: {line}", file=sys.stderr)
        return 1
    for line in skipped:
        print(f"masep bench-import: {line}", file=sys.stderr)
    for src, folder in done:
        print(f"masep bench-import: {src} -> {folder}")
    return 0
