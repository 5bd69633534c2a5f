"""`python -m masep.bench.table ROOT`: one table of the GPU benchmark runs under ROOT (run
folders of experiment `bench`), with ratios measured in the same run (strategy / single GPU,
achieved / ceiling).

Read from the run folders with pyarrow alone (GPU machines have no DuckDB). Timing figures are
medians over the steady steps (after the first 10%, at least one, as in the database's views);
energy per token is the steady-state energy windows' GPU energy over their tokens.
`build` gives the table as cells (the report renders them as HTML); `markdown` as text."""
from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from masep.bench import decode_bound_ms
from masep.config import config_from_dict
from masep.telemetry.energy import warmup_steps
from masep.telemetry.flops import mfu

MEDIANS = ("step_time_s", "compute_s", "idle_s")


def load_run(folder: Path) -> dict:
    """run.json of a run folder, with its rows by kind (steps, inference, energy_window)."""
    run = json.loads((Path(folder) / "run.json").read_text())
    for kind in ("steps", "inference", "energy_window"):
        run[kind] = [r for f in sorted(Path(folder).glob(f"{kind}-rank*.parquet")) for r in pq.read_table(f).to_pylist()]
    return run


def find_runs(root: Path) -> list[dict]:
    """The benchmark runs under `root`, by run id."""
    runs = [load_run(p.parent) for p in Path(root).rglob("run.json")]
    return sorted((r for r in runs if r.get("experiment") == "bench"), key=lambda r: r["run_id"])


def per_rank_medians(run: dict) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for rank in sorted({r["rank"] for r in run["steps"]}):
        rows = sorted((r for r in run["steps"] if r["rank"] == rank), key=lambda r: r["step"])
        rows = rows[warmup_steps(len(rows)):] or rows[-1:]
        comm = [k for k in rows[0] if k.startswith("comm_")]
        out[rank] = {k: statistics.median(r[k] for r in rows) for k in MEDIANS + tuple(comm)}
        out[rank]["tokens"] = rows[0]["tokens"]
        out[rank]["peak_mem_bytes"] = max(r["peak_mem_bytes"] for r in run["steps"] if r["rank"] == rank)
    return out


def figures(run: dict) -> dict:
    """What a table row shows of one run."""
    cfg = config_from_dict(run["config"])
    ranks = per_rank_medians(run)
    world = run["world_size"]
    tps = ranks[0]["tokens"] / ranks[0]["step_time_s"]
    peak = (run.get("flops") or {}).get("peak_flops_per_gpu")
    windows = run["energy_window"]
    measured = windows and all(e["gpu_energy_j"] is not None for e in windows)
    return {
        "label": run["run_id"].split("/")[-2], "strategy": run["strategy"], "world_size": world, "ranks": ranks,
        "layout": run["config"]["parallel"], "tokens_per_s": tps,
        "mfu": mfu(tps, cfg.model, cfg.data.seq_len, world, peak) if peak else None,
        "energy_per_token_j": sum(e["gpu_energy_j"] for e in windows) / windows[0]["tokens"] if measured else None,
        "energy_reason": None if measured else "; ".join(sorted({str(e["energy_reason"]) for e in windows}))
        or "no energy window",
        "decode": [(d["context_len"], d["tpot_p50_ms"], d["tpot_p50_ms"] / decode_bound_ms(cfg, d["context_len"], d["batch"]))
                   for d in sorted((d for d in run["inference"] if d["rank"] == 0), key=lambda d: d["context_len"])],
    }


def _mfu(f: dict) -> str:
    return "not measured" if f["mfu"] is None else f"{f['mfu'] * 100:.1f}%"


def header(run: dict) -> str:
    """Device, torch version, date, commit and peak of one run."""
    gpus = (run.get("hardware") or {}).get("gpus") or ["cpu"]
    flops = run.get("flops") or {}
    peak = (f"peak {flops['peak_flops_per_gpu'] / 1e12:.0f} TFLOP/s per GPU" if flops.get("peak_flops_per_gpu")
            else f"no peak FLOP/s ({flops.get('peak_reason') or 'unknown GPU'}): MFU not measured")
    return (f"{gpus[0]}, torch {(run.get('versions') or {}).get('torch')}, {run['started_at']}, "
            f"commit {run.get('git_commit')}; {peak}")


@dataclass
class BenchTable:
    header: str               # device, torch, date, commit and peak of the first run
    columns: list[str]
    rows: list[list[str]]     # one per run, cells formatted
    notes: list[str]          # ratios against the goals


def build(runs: list[dict]) -> BenchTable:
    """The table of benchmark runs (`load_run`), as cells."""
    figs = [figures(r) for r in runs]
    single = next((f for f in figs if f["strategy"] == "single"), None)
    columns = ["run", "GPUs", "step ms", "tok/s/GPU", "tok/s all", "vs 1 GPU", "MFU", "compute ms (per rank)",
               "comm ms by kind (rank 0)", "idle ms", "peak GiB (per rank)", "energy mJ/token"] \
        + [f"TPOT ms @{ctx} (x bound)" for ctx, _, _ in figs[0]["decode"]]
    rows = []
    for f in figs:
        ranks = f["ranks"]
        comm = ", ".join(f"{k[5:-2]} {v * 1e3:.0f}" for k, v in ranks[0].items() if k.startswith("comm_") and v > 0)
        vs = f["tokens_per_s"] / single["tokens_per_s"] if single else None
        energy = f"{f['energy_per_token_j'] * 1e3:.2f}" if f["energy_per_token_j"] else \
            f"not measured ({f['energy_reason']})"
        cells = [f["label"], str(f["world_size"]), f"{ranks[0]['step_time_s'] * 1e3:.0f}",
                 f"{f['tokens_per_s'] / f['world_size']:.0f}", f"{f['tokens_per_s']:.0f}",
                 f"{vs:.2f}x" if vs else "-", _mfu(f),
                 " / ".join(f"{v['compute_s'] * 1e3:.0f}" for v in ranks.values()), comm or "none",
                 " / ".join(f"{v['idle_s'] * 1e3:.0f}" for v in ranks.values()),
                 " / ".join(f"{v['peak_mem_bytes'] / 2**30:.1f}" for v in ranks.values()), energy]
        cells += [f"{tpot:.2f} ({x:.1f}x)" for _, tpot, x in f["decode"]]
        rows.append(cells)
    notes = []
    if single:
        best = max((f for f in figs if f["world_size"] == 2), key=lambda f: f["tokens_per_s"], default=None)
        if best:
            notes.append(f"best 2-GPU run: {best['label']}, {best['tokens_per_s'] / single['tokens_per_s']:.2f}x "
                         f"the single-GPU throughput (goal 1.8x)")
        notes.append(f"single-GPU MFU {_mfu(single)} (goal 45%)")
    ma = next((f for f in figs if f["strategy"] == "ma_sep"), None)
    if ma:
        n_attn = ma["layout"]["attn_tp"] * ma["layout"]["attn_replicas"]
        attn = max(v["compute_s"] for k, v in ma["ranks"].items() if k < n_attn)
        moe = max(v["compute_s"] for k, v in ma["ranks"].items() if k >= n_attn)
        # The MoE side's transfer is not separable from its waiting, so the bound uses the
        # attention side's dispatch time as T_comm.
        comm = statistics.median(v["comm_moe_dispatch_s"] for k, v in ma["ranks"].items() if k < n_attn)
        bound = max(attn, moe + comm)
        step = ma["ranks"][0]["step_time_s"]
        notes.append(f"ma_sep step {step * 1e3:.0f} ms vs max(attention {attn * 1e3:.0f}, "
                     f"MoE {moe * 1e3:.0f} + transfer {comm * 1e3:.0f}) = {bound * 1e3:.0f} ms: "
                     f"{step / bound:.2f}x (goal <= 1.15x)")
    paths = {f["label"]: r["decode_path"] for f, r in zip(figs, runs) if r.get("decode_path")}
    if paths:
        notes.append("decode: " + "; ".join(f"{k}: {v}" for k, v in paths.items())
                     + (" (TPOT of different decode paths compares implementations as much as layouts)"
                        if len(set(paths.values())) > 1 else ""))
    return BenchTable(header(runs[0]), columns, rows, notes)


def markdown(t: BenchTable) -> str:
    lines = ["| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
    lines += ["| " + " | ".join(cells) + " |" for cells in t.rows]
    return "\n".join([t.header, ""] + lines + [""] + [f"- {n}" for n in t.notes]) + "\n"


if __name__ == "__main__":
    runs = [r for root in sys.argv[1:] for r in find_runs(Path(root))]
    print(markdown(build(runs)) if runs else f"no benchmark run under {' '.join(sys.argv[1:])}")
