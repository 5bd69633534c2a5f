import sys
from pathlib import Path

import pytest

from masep.data import tokenize as tok

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
