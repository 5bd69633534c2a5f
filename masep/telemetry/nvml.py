"""GPU telemetry from NVML (`nvidia-ml-py`), sampled by a background thread of each rank.

Every ~0.1 s a sample records the rank's GPU utilisation and memory-controller utilisation
(percent of the last sample period in which a kernel ran / device memory was read or written),
board power, the total-energy counter (mJ since the driver loaded; it advances every 20-100 ms),
memory in use, and, where the host exposes it, the CPU package energy from RAPL
(`masep.telemetry.energy.Rapl`). Time is Unix seconds (`time.time()`), the clock the worker
stamps step ends with, so steady-state windows can be cut from the samples afterwards.

A value the machine cannot give is NULL, and `gpu_reason` / `energy_reason` / `cpu_energy_reason`
say why ("no GPU", "NVML unavailable: ...", ...). With nothing to sample, no thread runs: the
sampler keeps one sample at start and one at stop, which carry the reasons.
"""
from __future__ import annotations

import io
import socket
import threading
import time
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from masep.telemetry.energy import Rapl, segment_windows
from masep.telemetry.writer import atomic_write_bytes, read_parquet_rows

SAMPLE_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("rank", pa.int64()), ("host", pa.string()),
    ("segment_start_s", pa.float64()),  # when this process's sampler started (one per attempt)
    ("t_s", pa.float64()),  # Unix seconds
    ("gpu_util", pa.float64()),  # percent
    ("mem_util", pa.float64()),  # percent, memory-controller busy time
    ("power_w", pa.float64()),
    ("energy_mj", pa.int64()),  # NVML total-energy counter
    ("mem_used_bytes", pa.int64()),
    ("cpu_energy_j", pa.float64()),  # RAPL package energy since this sampler started
    ("gpu_reason", pa.string()),
    ("energy_reason", pa.string()),
    ("cpu_energy_reason", pa.string()),
])


def _nvml_error(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".strip().rstrip(":")


class NvmlGpu:
    """The NVML handle of one CUDA device (matched by UUID, so CUDA_VISIBLE_DEVICES and
    NVML's own numbering may differ). `reason` is set when nothing can be read."""

    def __init__(self, device: torch.device | str):
        device = torch.device(device)
        self.handle = None
        self.reason: Optional[str] = None
        self.energy_reason: Optional[str] = None
        self._nvml = None
        if device.type != "cuda":
            self.reason = self.energy_reason = "no GPU"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as e:  # noqa: BLE001 - any NVML failure means "not measured"
            self.reason = self.energy_reason = f"NVML unavailable: {_nvml_error(e)}"
            return
        self._nvml = pynvml
        try:
            want = str(torch.cuda.get_device_properties(device).uuid).removeprefix("GPU-")
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                uuid = pynvml.nvmlDeviceGetUUID(h)
                uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
                if uuid.removeprefix("GPU-") == want:
                    self.handle = h
                    break
            else:
                self.reason = self.energy_reason = f"{device} not found among NVML's GPUs"
        except Exception as e:  # noqa: BLE001
            self.reason = self.energy_reason = f"NVML unavailable: {_nvml_error(e)}"
        if self.handle is not None:
            try:
                pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            except Exception as e:  # noqa: BLE001 - pre-Volta GPUs have no energy counter
                self.energy_reason = f"NVML energy counter unsupported: {_nvml_error(e)}"

    def read(self) -> dict:
        if self.handle is None:
            return {}
        n, h = self._nvml, self.handle
        util = n.nvmlDeviceGetUtilizationRates(h)
        out = {"gpu_util": float(util.gpu), "mem_util": float(util.memory),
               "power_w": n.nvmlDeviceGetPowerUsage(h) / 1e3,
               "mem_used_bytes": int(n.nvmlDeviceGetMemoryInfo(h).used)}
        if self.energy_reason is None:
            out["energy_mj"] = int(n.nvmlDeviceGetTotalEnergyConsumption(h))
        return out

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - shutting down a library that failed to start
                pass
            self._nvml = None


class TelemetrySampler:
    """Samples this rank's GPU (NVML) and host CPU energy (RAPL) every `interval_s` on a daemon
    thread between `start()` and `stop()`; `rows()` returns the samples so far."""

    def __init__(self, run_id: str, rank: int, device: torch.device | str, interval_s: float = 0.1,
                 rapl: Optional[Rapl] = None):
        self.run_id, self.rank, self.interval_s = run_id, rank, interval_s
        self.gpu = NvmlGpu(device)
        self.rapl = rapl if rapl is not None else Rapl()
        self.host = socket.gethostname()
        self.segment_start_s: Optional[float] = None
        self._rows: list[dict] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.error: Optional[str] = None

    @property
    def measures_anything(self) -> bool:
        return self.gpu.handle is not None or self.rapl.reason is None

    def sample(self) -> dict:
        with self._lock:  # the thread and a writer's closing sample: one at a time, in time order
            row = {"run_id": self.run_id, "rank": self.rank, "host": self.host,
                   "segment_start_s": self.segment_start_s, "t_s": time.time(),
                   "gpu_util": None, "mem_util": None, "power_w": None, "energy_mj": None,
                   "mem_used_bytes": None, "cpu_energy_j": None,
                   "gpu_reason": self.gpu.reason, "energy_reason": self.gpu.energy_reason,
                   "cpu_energy_reason": self.rapl.reason}
            # A failed read leaves this sample NULL with the error; sampling goes on.
            try:
                row.update(self.gpu.read())
            except Exception as e:  # noqa: BLE001
                row["gpu_reason"] = row["energy_reason"] = f"NVML read failed: {_nvml_error(e)}"
            try:
                row["cpu_energy_j"] = self.rapl.read_j()
            except (OSError, ValueError) as e:
                row["cpu_energy_reason"] = f"RAPL read failed: {type(e).__name__}: {e}"
            self._rows.append(row)
            return row

    def _loop(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                self.sample()
        except Exception as e:  # noqa: BLE001 - a failing sensor ends sampling, not the training run
            self.error = f"{type(e).__name__}: {e}"

    def start(self) -> "TelemetrySampler":
        self.segment_start_s = time.time()
        self.sample()
        if self.measures_anything:
            self._thread = threading.Thread(target=self._loop, name=f"telemetry-rank{self.rank}", daemon=True)
            self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self.segment_start_s is not None and not self._stop.is_set()

    def stop(self) -> None:
        """Join the thread and take a last sample (it closes every window); idempotent."""
        if not self.running:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.sample()
        self.gpu.close()

    def rows(self) -> list[dict]:
        with self._lock:
            return list(self._rows)


WINDOW_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("rank", pa.int64()), ("host", pa.string()),
    ("segment_start_s", pa.float64()), ("warmup_steps", pa.int64()),
    ("first_step", pa.int64()), ("last_step", pa.int64()), ("steps", pa.int64()), ("tokens", pa.int64()),
    ("window_start_s", pa.float64()), ("window_end_s", pa.float64()), ("window_s", pa.float64()),
    ("samples", pa.int64()), ("gpu_util_mean", pa.float64()), ("mem_util_mean", pa.float64()),
    ("power_mean_w", pa.float64()), ("gpu_energy_j", pa.float64()), ("cpu_energy_j", pa.float64()),
    ("gpu_reason", pa.string()), ("energy_reason", pa.string()), ("cpu_energy_reason", pa.string()),
])


def write_rows(path: Path, rows: list[dict], schema: pa.Schema) -> None:
    """Rows -> Parquet with a fixed schema (all-NULL columns keep their type), atomically."""
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    atomic_write_bytes(Path(path), buf.getvalue())


class RunTelemetry:
    """Telemetry of one rank of a training run: samples while it lives, and on `write(step_rows)`
    the files `telemetry-rank<R>.parquet` (every sample) and `energy_window-rank<R>.parquet`
    (one steady-state window per process attempt). Samples of earlier attempts of the same run
    folder (a resumed run) are kept, and their windows recomputed from the step rows that survive."""

    def __init__(self, out_dir: Path | str, run_id: str, rank: int, device, total_steps: int,
                 interval_s: float = 0.1):
        out_dir = Path(out_dir)
        self.samples_path = out_dir / f"telemetry-rank{rank}.parquet"
        self.windows_path = out_dir / f"energy_window-rank{rank}.parquet"
        self.total_steps = total_steps
        self.earlier = [r for r in read_parquet_rows(self.samples_path) if r.get("run_id") == run_id]
        self.sampler = TelemetrySampler(run_id, rank, device, interval_s).start()

    def write(self, step_rows: list[dict]) -> None:
        if self.sampler.running:
            self.sampler.sample()  # closes the window of the steps so far, should this process be killed
        samples = self.earlier + self.sampler.rows()
        write_rows(self.samples_path, samples, SAMPLE_SCHEMA)
        write_rows(self.windows_path, segment_windows(samples, step_rows, self.total_steps), WINDOW_SCHEMA)

    def stop(self) -> None:
        """End sampling (a last sample closes the final window); `write` afterwards."""
        self.sampler.stop()
