import os
import sys
from pathlib import Path

# One intra-op thread per process, inherited by every rank the tests start: the suite runs
# several processes per core (pytest-xdist workers, their ranks, SLURM's tasks), and
# oversubscribed thread pools make small CPU kernels many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from masep.data import tokenize as tok  # noqa: E402

# Spawned rank processes import test helpers by module name, and test modules import `helpers`:
# keep tests/ importable.
TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from helpers import c4_file, local_cfg, make_docs, write_gz  # noqa: E402


@pytest.fixture
def local_shard(tmp_path):
    docs = make_docs(240)
    write_gz(c4_file(tmp_path), docs)
    cfg = local_cfg(tmp_path)
    status, manifest = tok.tokenize_shard(cfg.data, 0)
    assert status == "built"
    return cfg, docs, manifest


# scripts/run_tests.sh runs the suite on pytest-xdist workers one group at a time: a test file,
# or all of tests/slurm (its jobs share one node, and it runs beside the rest). Groups go out
# longest first (as measured on a 2-core machine), so that no long file starts last.
LONGEST_FIRST = ["slurm", "test_workflow.py", "test_faults.py", "test_failover.py", "test_faults_operator.py",
                 "test_parallel_parity.py", "test_report.py", "test_parallel_ma_sep.py", "test_balance.py",
                 "test_bench.py"]


def _group(item: pytest.Item) -> str:
    return "slurm" if TESTS_DIR / "slurm" in item.path.parents else item.path.name


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group(item)))
    order = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(_group(item), len(order)))  # stable: a file keeps its order
