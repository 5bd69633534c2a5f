"""The run folder: each rank writes its own Parquet files; rank 0 writes run.json last.

Every file is written to a temporary name in the same folder and renamed into place, so a
reader (or Snakemake) never sees a half-written file. Files get the usual permissions (0666 less
the umask, so the group of a shared results folder can collect them), not mkstemp's 0600.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _temp_beside(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_UMASK)
    return fd, tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def write_parquet(path: Path, rows: list[dict]) -> None:
    """Rows (dicts with the same keys) -> one Parquet file, atomically. Nothing for no rows."""
    if not rows:
        return
    table = pa.Table.from_pylist(rows)
    path = Path(path)
    fd, tmp = _temp_beside(path)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_parquet_rows(path: Path) -> list[dict]:
    path = Path(path)
    return pq.read_table(path).to_pylist() if path.exists() else []


def parquet_rows(path: Path) -> int:
    """Rows of a Parquet file, from its footer (raises pyarrow's error when damaged)."""
    return pq.ParquetFile(path).metadata.num_rows


def file_manifest(folder: Path) -> dict[str, int]:
    """Every Parquet file of a run folder with its row count: run.json lists them so that a
    lost or damaged file is found before its rows go missing from the database."""
    return {f.name: parquet_rows(f) for f in sorted(Path(folder).glob("*.parquet"))}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def hardware() -> dict[str, Any]:
    import torch  # here: `masep collect` imports this module and needs no torch (seconds of import)

    info: dict[str, Any] = {"machine": platform.machine(), "cpus": os.cpu_count(),
                            "processor": platform.processor() or None}
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_kb"] = int(f.readline().split()[1])
    except OSError:
        info["mem_total_kb"] = None
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        info["gpus"] = []
    return info


def host() -> str:
    return socket.gethostname()
