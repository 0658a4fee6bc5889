#!/usr/bin/env bash
# Install, then run the test suite (CPU, no downloads) on one pytest-xdist worker per core, at most 8 (each
# holds torch and the simulators in memory), each test module on one worker (its module fixtures are built
# once), the longest modules first (tests/conftest.py). Options are passed on to pytest: `-n 0` runs it in one
# process.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
workers=$(nproc)
exec .venv/bin/python -m pytest -q -n $((workers < 8 ? workers : 8)) --dist loadscope --no-loadscope-reorder "$@"
