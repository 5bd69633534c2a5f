"""Which code produced a result: the git commit of the checkout (marked "-dirty" when tracked
files differ from it) and the versions of the packages around it. Standard library and torch
only, so GPU machines without the project's other dependencies record them too."""
from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch


def git_commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        res = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if res.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return res.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def package_versions() -> dict[str, str | None]:
    """Python, torch, CUDA and the project's dependencies (None where one is not installed)."""
    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("masep", "numpy", "snakemake", "submitit", "duckdb", "datasets", "tiktoken", "pyarrow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["cuda"] = torch.version.cuda
    return out
