"""masep.launch with executor=slurm on a real SLURM cluster (scripts/slurm_cluster.sh up).

Skipped unless `sinfo` shows a usable node and `sacct` answers (submitit reads job states from
accounting).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time

import cloudpickle
import pytest

from masep.config import load_config
from masep.launch import LaunchError, launch
from helpers import AllReduceRanks, FailOnRank, Sleep

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _cluster() -> tuple[str | None, str]:
    if not (shutil.which("sinfo") and shutil.which("sacct")):
        return None, "no SLURM client tools"
    try:
        info = subprocess.run(["sinfo", "-h", "-o", "%P %t"], capture_output=True, text=True, timeout=10)
        acct = subprocess.run(["sacct", "-n", "-X", "-S", "now-1minutes"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"SLURM does not answer ({e})"
    if info.returncode or acct.returncode:
        return None, f"SLURM not usable: {(info.stderr or acct.stderr).strip()}"
    for line in info.stdout.split("\n"):
        parts = line.split()
        if len(parts) == 2 and parts[1] in ("idle", "mix", "alloc"):
            return parts[0].rstrip("*"), ""
    return None, f"no usable node: {info.stdout.strip()!r}"


PARTITION, WHY = _cluster()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(PARTITION is None, reason=WHY)]


def _cfg(tmp_path, *overrides):
    return load_config("tiny", ["launch.executor=slurm", f"launch.partition={PARTITION}", "launch.time_min=5",
                                "launch.wait_timeout_s=120", f"launch.log_dir={tmp_path}/logs", *overrides])


def _sacct_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True,
                         text=True, timeout=10)
    return out.stdout.strip()


@pytest.mark.timeout(180)
def test_slurm_ranks_all_reduce_and_see_their_slurm_job_id(tmp_path, capsys):
    results = launch(AllReduceRanks(), _cfg(tmp_path), world_size=2, job_name="masep-test-allreduce",
                     folder=tmp_path / "job")
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["sum"] == 1.0 and r["world"] == 2 for r in results)
    job_id = results[0]["job_id"]
    assert job_id.isdigit() and {r["slurm_job_id"] for r in results} == {job_id}
    assert f"submitted job {job_id} (SLURM) with 2 task(s) on slurm" in capsys.readouterr().out


@pytest.mark.timeout(180)
def test_slurm_failure_raises_with_logs(tmp_path):
    with pytest.raises(LaunchError) as e:
        launch(FailOnRank(0), _cfg(tmp_path), world_size=1, job_name="masep-test-fail", folder=tmp_path / "job")
    msg = str(e.value)
    assert "(SLURM): rank 0 failed: ValueError: boom from rank 0" in msg and msg.endswith("_0_log.err")


@pytest.mark.timeout(180)
def test_slurm_wait_timeout_cancels_the_job(tmp_path):
    with pytest.raises(LaunchError, match=r"job (\d+) \(SLURM\) did not finish within") as e:
        launch(Sleep(300), _cfg(tmp_path, "launch.wait_timeout_s=5"), world_size=1, job_name="masep-test-slow",
               folder=tmp_path / "job")
    job_id = e.value.args[0].split()[1]
    deadline = time.monotonic() + 60
    while not _sacct_state(job_id).startswith("CANCELLED") and time.monotonic() < deadline:
        time.sleep(1)
    assert _sacct_state(job_id).startswith("CANCELLED")
