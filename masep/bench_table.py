"""`python -m masep.bench_table OUT/*.json`: one table from GPU benchmark files, with ratios
measured in the same run (strategy / single GPU, achieved / ceiling).

`build` gives the table as cells (the report renders them as HTML); `table` as markdown."""
from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from masep.telemetry.timing import COMM_KINDS


# Keys every benchmark summary has; a JSON file with none of them is another kind of file
# (e.g. the A/B results of scripts/bench_variants.py, kept in the same folder).
SUMMARY_KEYS = ("label", "strategy", "world_size", "steps")


def is_summary(d) -> bool:
    """Whether a JSON document claims to be a benchmark summary (it may still be a broken one)."""
    return isinstance(d, dict) and any(k in d for k in SUMMARY_KEYS)


def _mfu(r: dict) -> str:
    return "not measured" if r.get("mfu") is None else f"{r['mfu'] * 100:.1f}%"


def per_rank_medians(d: dict) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for rank in sorted({r["rank"] for r in d["steps"]}):
        rows = [r for r in d["steps"] if r["rank"] == rank]
        out[rank] = {k: statistics.median(r[k] for r in rows)
                     for k in ["step_time_s", "compute_s", "idle_s"] + [f"comm_{c}_s" for c in COMM_KINDS]}
    return out


@dataclass
class BenchTable:
    header: str               # device, torch, date and peak of the first run
    columns: list[str]
    rows: list[list[str]]     # one per run, cells formatted
    notes: list[str]          # ratios against the goals


def build(runs: list[dict]) -> BenchTable:
    """The table of benchmark summaries (the JSON files `masep.bench` writes), as cells."""
    single = next((r for r in runs if r["strategy"] == "single"), None)
    columns = ["run", "GPUs", "step ms", "tok/s/GPU", "tok/s all", "vs 1 GPU", "MFU", "compute ms (per rank)",
               "comm ms by kind (rank 0)", "idle ms", "peak GiB (per rank)", "energy mJ/token"] \
        + [f"TPOT ms @{d['context_len']} (x bound)" for d in (runs[0]["decode"] or [])]
    rows = []
    for r in runs:
        ranks = per_rank_medians(r)
        comm = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in r["comm_median_s"].items() if v > 0) or "none"
        vs = r["tokens_per_s"] / single["tokens_per_s"] if single else None
        energy = f"{r['energy_per_token_j'] * 1e3:.2f}" if r.get("energy_per_token_j") else \
            f"not measured ({r.get('energy_reason')})"
        cells = [r["label"], str(r["world_size"]), f"{r['step_time_median_s'] * 1e3:.0f}",
                 f"{r['tokens_per_s_per_gpu']:.0f}", f"{r['tokens_per_s']:.0f}",
                 f"{vs:.2f}x" if vs else "-", _mfu(r),
                 " / ".join(f"{v['compute_s'] * 1e3:.0f}" for v in ranks.values()), comm,
                 " / ".join(f"{v['idle_s'] * 1e3:.0f}" for v in ranks.values()),
                 " / ".join(f"{b / 2**30:.1f}" for b in r["peak_mem_bytes_by_rank"].values()), energy]
        cells += [f"{d['tpot_ms']:.2f} ({d['tpot_over_bound']:.1f}x)" for d in r["decode"]]
        rows.append(cells)
    ma = next((r for r in runs if r["strategy"] == "ma_sep"), None)
    notes = []
    if single:
        best = max((r for r in runs if r["world_size"] == 2), key=lambda r: r["tokens_per_s"], default=None)
        if best:
            notes.append(f"best 2-GPU run: {best['label']}, {best['tokens_per_s'] / single['tokens_per_s']:.2f}x "
                         f"the single-GPU throughput (goal 1.8x)")
        notes.append(f"single-GPU MFU {_mfu(single)} (goal 45%)")
    if ma:
        ranks = per_rank_medians(ma)
        layout = ma["config"]["parallel"]
        n_attn = layout["attn_tp"] * layout["attn_replicas"]
        attn = max(v["compute_s"] for k, v in ranks.items() if int(k) < n_attn)
        moe_ranks = [v for k, v in ranks.items() if int(k) >= n_attn]
        moe = max(v["compute_s"] for v in moe_ranks)
        # The MoE side's transfer: its dispatch/combine time minus nothing else it waits on is not
        # separable from waiting, so the bound uses the attention side's dispatch time as T_comm.
        comm = statistics.median(v["comm_moe_dispatch_s"] for k, v in ranks.items() if int(k) < n_attn)
        bound = max(attn, moe + comm)
        notes.append(f"ma_sep step {ma['step_time_median_s'] * 1e3:.0f} ms vs max(attention {attn * 1e3:.0f}, "
                     f"MoE {moe * 1e3:.0f} + transfer {comm * 1e3:.0f}) = {bound * 1e3:.0f} ms: "
                     f"{ma['step_time_median_s'] / bound:.2f}x (goal <= 1.15x)")
    paths = {r["label"]: r["decode_path"] for r in runs if r.get("decode_path")}
    if paths:
        notes.append("decode: " + "; ".join(f"{k}: {v}" for k, v in paths.items())
                     + (" (TPOT of different decode paths compares implementations as much as layouts)"
                        if len(set(paths.values())) > 1 else ""))
    meta = runs[0]
    peak = (f"peak {meta['peak_flops'] / 1e12:.0f} TFLOP/s per GPU" if meta.get("peak_flops")
            else f"no peak FLOP/s ({meta.get('peak_reason') or 'unknown GPU'}): MFU not measured")
    header = f"{meta['device']}, torch {meta['torch']}, {meta['date']}; {peak}"
    return BenchTable(header, columns, rows, notes)


def markdown(t: BenchTable) -> str:
    lines = ["| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
    lines += ["| " + " | ".join(cells) + " |" for cells in t.rows]
    return "\n".join([t.header, ""] + lines + [""] + [f"- {n}" for n in t.notes]) + "\n"


def table(files: list[Path]) -> str:
    return markdown(build([json.loads(Path(f).read_text()) for f in files]))


if __name__ == "__main__":
    print(table([Path(a) for a in sys.argv[1:]]))
