"""`masep tokenize` under launch.executor=slurm: the shards are encoded in a SLURM job of one
task (CPUs, no GPU) rather than on the submitting host, and a re-run reuses the shard."""
from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from masep.config import load_config
from masep.data.shards import MANIFEST, shard_dir


@pytest.mark.timeout(400)
def test_tokenize_runs_as_a_slurm_job_and_a_rerun_reuses_the_shard(slurm_cluster):
    folder = slurm_cluster.folder("tokenize")
    sets = ["launch.executor=slurm", f"launch.partition={slurm_cluster.partition}",
            f"data.tokens_dir={folder / 'tokens'}", f"launch.log_dir={folder / 'logs'}",
            "launch.time_min=5", "launch.wait_timeout_s=300"]
    cmd = [sys.executable, "-m", "masep.cli", "tokenize", "--config", "tiny", "--set", *sets,
           "--shard", "0", "--threads", "1"]
    try:
        first = subprocess.run(cmd, capture_output=True, text=True, timeout=360)
        assert first.returncode == 0, first.stderr[-3000:]
        job = re.search(r"submitted job (\d+) \(SLURM\)", first.stdout)
        assert job, first.stdout
        manifest = shard_dir(load_config("tiny", sets).data, 0) / MANIFEST
        assert manifest.exists()
        deadline = time.monotonic() + 30  # slurmdbd records the end a little after the job
        while True:
            acct = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job[1], "-o", "JobName,State,AllocTRES"],
                                  capture_output=True, text=True, timeout=30, check=True).stdout.split("|")
            if acct[1].startswith("COMPLETED") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert acct[0] == "tokenize-sample-0" and acct[1].startswith("COMPLETED"), acct
        assert "gres/gpu" not in acct[2]
        written = manifest.stat().st_mtime_ns
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=360)
        assert again.returncode == 0, again.stderr[-3000:]
        assert manifest.stat().st_mtime_ns == written  # verified and kept, not rewritten
    finally:
        subprocess.run(["scancel", "--name=tokenize-sample-0"], capture_output=True, timeout=30, check=False)
