"""CPU energy from RAPL, and energy over steady-state windows of training steps.

RAPL: Linux's powercap exposes one cumulative counter per CPU package
(`/sys/class/powercap/intel-rapl:<N>/energy_uj`, also on AMD), which wraps at
`max_energy_range_uj`. Sub-zones (`intel-rapl:N:M`, core / uncore / dram) are parts of a
package and are not added again. Readers are usually root-only since 2020 (CVE-2020-8694).

Steady-state window (per rank and per process of a run, a "segment": a resumed run has one per
attempt, possibly on another GPU): from the start of the first step after warm-up to the end of
the last step, where warm-up is the first ceil(10%) of the run's steps (at least one), as in
the `run_summary` view, counted from the first step of each attempt (a new process warms up
again). Energy in the window is the counter's increase between the window's ends,
each end linearly interpolated between the samples around it (the GPU counter advances every
20-100 ms, sampled every 0.1 s: windows under `MIN_WINDOW_S` are left NULL). Energy per token
divides by the tokens of the window's steps (the global batch's tokens, the same on every rank).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional, Sequence

RAPL_ROOT = Path("/sys/class/powercap")
MIN_WINDOW_S = 1.0


class Rapl:
    """Package energy summed over the host's CPU packages, in joules since the first read,
    corrected for wrap-around; `reason` says why it is unavailable (then `read_j()` is None).
    Call `read_j()` more often than the counter wraps (minutes at full power)."""

    def __init__(self, root: Path | str = RAPL_ROOT):
        root = Path(root)
        self.reason: Optional[str] = None
        self._files: list[Path] = []
        self._max_uj: list[int] = []
        self._last: list[int] = []
        self._total_uj = 0
        if not root.is_dir():
            self.reason = f"no RAPL: {root} not present"
            return
        zones = sorted((p for p in root.iterdir() if re.fullmatch(r"intel-rapl:\d+", p.name)),
                       key=lambda p: int(p.name.split(":")[1]))
        # psys (platform) zones cover the packages too: keep package zones only where named.
        named = [(p, _read_text(p / "name")) for p in zones]
        zones = [p for p, name in named if name is None or name.startswith("package")]
        if not zones:
            self.reason = f"no RAPL: no package zones under {root}"
            return
        try:
            self._max_uj = [int((p / "max_energy_range_uj").read_text()) for p in zones]
            self._files = [p / "energy_uj" for p in zones]
            self._last = [int(f.read_text()) for f in self._files]
        except (OSError, ValueError) as e:
            self.reason = f"RAPL unreadable: {type(e).__name__}: {getattr(e, 'strerror', None) or e}"
            self._files = []

    def read_j(self) -> Optional[float]:
        if self.reason is not None:
            return None
        for i, f in enumerate(self._files):
            now = int(f.read_text())
            delta = now - self._last[i]
            if delta < 0:  # wrapped: counted up to the range, restarted from zero
                delta += self._max_uj[i]
            self._total_uj += delta
            self._last[i] = now
        return self._total_uj / 1e6


def _read_text(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def warmup_steps(total_steps: int) -> int:
    """Steps excluded from steady-state figures: the first 10%, at least one."""
    return max(1, math.ceil(0.1 * total_steps))


def interpolate(times: Sequence[float], values: Sequence[Optional[float]], t: float) -> Optional[float]:
    """Value at `t`, linear between the samples around it; None outside the sampled span."""
    pts = [(ti, vi) for ti, vi in zip(times, values) if vi is not None]
    before = [p for p in pts if p[0] <= t]
    after = [p for p in pts if p[0] >= t]
    if not before or not after:
        return None
    (t0, v0), (t1, v1) = max(before), min(after)
    if t1 == t0:
        return float(v0)
    return v0 + (v1 - v0) * (t - t0) / (t1 - t0)


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _first(rows: list[dict], key: str) -> Optional[str]:
    return next((r[key] for r in rows if r.get(key)), None)


def segment_windows(samples: list[dict], step_rows: list[dict], total_steps: int) -> list[dict]:
    """One steady-state window row per sampler segment of one rank.

    `samples`: rows of `TelemetrySampler` (possibly from several segments); `step_rows`: this
    rank's step rows with `step`, `tokens`, `step_time_s` and `t_end_unix_s`. A step belongs to
    the latest segment that started before it; only steady steps (after the segment's own
    warm-up) count.
    """
    warm = warmup_steps(total_steps)
    segments = sorted({s["segment_start_s"] for s in samples})
    out = []
    for i, seg in enumerate(segments):
        nxt = segments[i + 1] if i + 1 < len(segments) else math.inf
        seg_samples = sorted((s for s in samples if s["segment_start_s"] == seg), key=lambda s: s["t_s"])
        last_sample_t = seg_samples[-1]["t_s"]
        ran = sorted((r for r in step_rows
                      if r.get("t_end_unix_s") is not None and seg <= r["t_end_unix_s"] - r["step_time_s"] < nxt),
                     key=lambda r: r["step"])
        # each attempt warms up again; a window needs a sample after it
        steps = [r for r in ran[warm:] if r["t_end_unix_s"] <= last_sample_t]
        base = seg_samples[0]
        row = {"run_id": base["run_id"], "rank": base["rank"], "host": base["host"],
               "segment_start_s": seg, "warmup_steps": warm,
               "first_step": None, "last_step": None, "steps": len(steps), "tokens": None,
               "window_start_s": None, "window_end_s": None, "window_s": None, "samples": 0,
               "gpu_util_mean": None, "mem_util_mean": None, "power_mean_w": None,
               "gpu_energy_j": None, "cpu_energy_j": None,
               "gpu_reason": _first(seg_samples, "gpu_reason"),
               "energy_reason": _first(seg_samples, "energy_reason"),
               "cpu_energy_reason": _first(seg_samples, "cpu_energy_reason")}
        if not steps:
            reason = ("no steady-state step (warm-up only)" if len(ran) <= warm
                      else "no telemetry sample after its steady steps")
            row.update(gpu_reason=row["gpu_reason"] or reason, energy_reason=row["energy_reason"] or reason,
                       cpu_energy_reason=row["cpu_energy_reason"] or reason)
            out.append(row)
            continue
        t0 = steps[0]["t_end_unix_s"] - steps[0]["step_time_s"]
        t1 = steps[-1]["t_end_unix_s"]
        inside = [s for s in seg_samples if t0 <= s["t_s"] <= t1]
        row.update(first_step=steps[0]["step"], last_step=steps[-1]["step"],
                   tokens=sum(int(r["tokens"]) for r in steps),
                   window_start_s=t0, window_end_s=t1, window_s=t1 - t0, samples=len(inside),
                   gpu_util_mean=_mean(s["gpu_util"] for s in inside),
                   mem_util_mean=_mean(s["mem_util"] for s in inside),
                   power_mean_w=_mean(s["power_w"] for s in inside))
        short = f"steady window {t1 - t0:.2f} s < {MIN_WINDOW_S:g} s (energy counters advance every 20-100 ms)"
        times = [s["t_s"] for s in seg_samples]
        # A reason stands only where the value is missing (a failed read now and then leaves a
        # NULL sample that interpolation steps over).
        for key, column, scale, reason_key in (("gpu_energy_j", "energy_mj", 1e-3, "energy_reason"),
                                               ("cpu_energy_j", "cpu_energy_j", 1.0, "cpu_energy_reason")):
            values = [s[column] for s in seg_samples]
            if all(v is None for v in values):
                row[reason_key] = row[reason_key] or "not sampled"
                continue
            e0, e1 = interpolate(times, values, t0), interpolate(times, values, t1)
            if t1 - t0 < MIN_WINDOW_S:
                row[reason_key] = short
            elif e0 is None or e1 is None:
                row[reason_key] = "no energy sample around the window's ends"
            else:
                row[key], row[reason_key] = (e1 - e0) * scale, None
        if row["gpu_util_mean"] is None:
            row["gpu_reason"] = row["gpu_reason"] or "no telemetry sample inside the steady window"
        else:
            row["gpu_reason"] = None
        out.append(row)
    return out
