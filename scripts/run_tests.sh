#!/usr/bin/env bash
# Run the whole test suite. Where this machine can host one (Debian, root), a one-node SLURM
# cluster is started first for tests/slurm and the daemons it started are stopped at the end;
# elsewhere those tests skip and say why. MASEP_SLURM=off skips the cluster, =on requires it.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${MASEP_SLURM:-auto}
started=0
if [ "$mode" != off ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    if scripts/slurm_cluster.sh status >/dev/null 2>&1; then
      : # already up (another run's cluster): use it, and leave it running afterwards
    elif scripts/slurm_cluster.sh up; then
      started=1
    elif [ "$mode" = on ]; then
      echo "run_tests: the SLURM cluster did not come up" >&2
      exit 1
    fi
  elif [ "$mode" = on ]; then
    echo "run_tests: MASEP_SLURM=on needs root and apt-get" >&2
    exit 1
  fi
fi
# Headless Chromium for the report's browser check (tests/test_report_browser.py), where this
# machine can install it (Debian, root); elsewhere that test skips and says why (not under CI=true).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
      || echo "run_tests: could not install chromium: the browser check will skip" >&2
  else
    echo "run_tests: no chromium and no root/apt-get to install it: the browser check will skip" >&2
  fi
fi
[ "$started" = 1 ] && trap 'scripts/slurm_cluster.sh down' EXIT
if [ $# -gt 0 ]; then
  python -m pytest "$@"
  exit
fi
# The whole suite on three pytest-xdist workers, one group of tests each at a time (a test file,
# or all of tests/slurm: tests/conftest.py): module fixtures run once, a file's tests keep their
# order, and the SLURM tests (their jobs queue on the one node) run beside the rest.
python -m pytest -n 3 --dist loadgroup --no-loadscope-reorder
