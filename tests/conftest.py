import sys
from pathlib import Path

# Spawned rank processes import test helpers by module name: keep tests/ importable.
TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))
