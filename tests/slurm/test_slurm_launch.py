"""masep.launch with executor=slurm on a real SLURM cluster: ranks that all-reduce, and a rank's
error. A job that outlives launch.wait_timeout_s: test_slurm_faults.py."""
from __future__ import annotations

import sys

import cloudpickle
import pytest

from masep.config import load_config
from masep.launch import LaunchError, launch
from helpers import AllReduceRanks, FailOnRank

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _cfg(cluster, tmp_path):
    return load_config("tiny", ["launch.executor=slurm", f"launch.partition={cluster.partition}", "launch.time_min=5",
                                "launch.wait_timeout_s=120", f"launch.log_dir={tmp_path}/logs"])


@pytest.mark.timeout(180)
def test_slurm_ranks_all_reduce_and_see_their_slurm_job_id(slurm_cluster, slurm_job_name, tmp_path, capsys):
    results = launch(AllReduceRanks(), _cfg(slurm_cluster, tmp_path), world_size=2, job_name=slurm_job_name,
                     folder=tmp_path / "job")
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["sum"] == 1.0 and r["world"] == 2 for r in results)
    job_id = results[0]["job_id"]
    assert job_id.isdigit() and {r["slurm_job_id"] for r in results} == {job_id}
    assert f"submitted job {job_id} (SLURM) with 2 task(s) on slurm" in capsys.readouterr().out


@pytest.mark.timeout(180)
def test_slurm_failure_raises_with_logs(slurm_cluster, slurm_job_name, tmp_path):
    with pytest.raises(LaunchError) as e:
        launch(FailOnRank(0), _cfg(slurm_cluster, tmp_path), world_size=1, job_name=slurm_job_name,
               folder=tmp_path / "job")
    msg = str(e.value)
    assert "(SLURM): rank 0 failed: ValueError: boom from rank 0" in msg and msg.endswith("_0_log.err")
