"""Fixtures for tests that run real jobs on a SLURM cluster (see scripts/slurm_cluster.sh).

Every test under tests/slurm/ is marked `slurm`. The tests skip unless a cluster answers:
`sinfo` works, the default partition has a usable node and `sacct` (accounting) works, because
submitit learns the state of a job from sacct.

The cluster is started by `scripts/slurm_cluster.sh up` before pytest runs, or by the
`slurm_cluster` fixture when MASEP_SLURM_AUTOSTART=1; then the fixture also stops, at the end of
the session, exactly the daemons it started (its own state dir keeps their pids).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest

HERE = Path(__file__).resolve().parent
CLUSTER_SCRIPT = HERE.parents[1] / "scripts" / "slurm_cluster.sh"
AUTOSTART_ENV = "MASEP_SLURM_AUTOSTART"
# A fresh machine installs the Debian packages first.
AUTOSTART_TIMEOUT_S = 900
USABLE_NODE_STATES = ("idle", "mixed", "allocated", "completing")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.slurm)


@dataclass(frozen=True)
class SlurmCluster:
    """A cluster that answers: where to submit, and a scratch folder the node can read."""

    partition: str
    node: str
    cpus: int
    scratch: Path  # session-wide; one host, so any local folder is shared with the node

    def folder(self, name: str) -> Path:
        """A new folder under `scratch` for one test's submitit logs and pickles."""
        path = self.scratch / f"{name}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path


def _run(cmd: list[str], timeout_s: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)


def probe_cluster() -> tuple[Optional[tuple[str, str, int]], str]:
    """((partition, node, cpus), "") when the cluster is usable, else (None, why not)."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return None, "sinfo/sbatch not installed"
    try:
        # scontrol ping answers at once; sinfo retries a missing controller for ~10 s.
        ping = _run(["scontrol", "ping"])
        if ping.returncode != 0:
            return None, f"slurmctld does not answer: {' '.join(ping.stdout.split()[:5])}"
        # %P marks the default partition with '*'; one line per partition and node state.
        info = _run(["sinfo", "-h", "-N", "-o", "%P|%N|%T|%c"])
        if info.returncode != 0:
            return None, f"sinfo failed: {info.stderr.strip()}"
        rows = [line.split("|") for line in info.stdout.splitlines() if line.strip()]
        default = [r for r in rows if r[0].endswith("*")] or rows
        usable = [r for r in default if r[2] in USABLE_NODE_STATES]
        if not usable:
            return None, f"no usable node in the default partition (sinfo: {info.stdout.strip()!r})"
        partition, node, _, cpus = usable[0]
        acct = _run(["sacct", "-n", "-X", "-S", "now-1minutes"])
        if acct.returncode != 0:
            return None, f"sacct fails, accounting is not configured: {acct.stderr.strip()}"
    except subprocess.TimeoutExpired as e:
        return None, f"{e.cmd[0]} did not answer within {e.timeout:g} s"
    return (partition.rstrip("*"), node, int(cpus)), ""


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    found, why = probe_cluster()
    state_dir: Optional[Path] = None
    if found is None and os.environ.get(AUTOSTART_ENV) == "1":
        # A state dir of its own: `down` then stops only what this fixture started, never the
        # daemons an earlier `slurm_cluster.sh up` started.
        state_dir = Path("/run/masep-slurm") / f"pytest-{os.getpid()}"
        env = {**os.environ, "MASEP_SLURM_STATE_DIR": str(state_dir)}
        up = subprocess.run([str(CLUSTER_SCRIPT), "up"], env=env, capture_output=True, text=True,
                            timeout=AUTOSTART_TIMEOUT_S)
        if up.returncode != 0:
            pytest.fail(f"{AUTOSTART_ENV}=1 but `slurm_cluster.sh up` failed:\n{up.stderr[-3000:]}")
        found, why = probe_cluster()
    if found is None:
        pytest.skip(f"SLURM cluster not up: run scripts/slurm_cluster.sh up ({why})")
    partition, node, cpus = found
    try:
        yield SlurmCluster(partition=partition, node=node, cpus=cpus,
                           scratch=tmp_path_factory.mktemp("slurm"))
    finally:
        if state_dir is not None:
            env = {**os.environ, "MASEP_SLURM_STATE_DIR": str(state_dir)}
            subprocess.run([str(CLUSTER_SCRIPT), "down"], env=env, timeout=120, check=False)
            shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture
def slurm_job_name(slurm_cluster: SlurmCluster) -> Iterator[str]:
    """A job name unique to this test; its jobs still queued or running at teardown are cancelled."""
    name = f"masep-test-{uuid.uuid4().hex[:10]}"
    yield name
    subprocess.run(["scancel", f"--name={name}"], capture_output=True, timeout=30, check=False)

