#!/usr/bin/env bash
# Install, then run the test suite (CPU, no downloads) on one pytest-xdist worker per core, each test module
# on one worker (its module fixtures are built once), the longest modules first (tests/conftest.py). Options
# are passed on to pytest: `-n 0` runs it in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec .venv/bin/python -m pytest -q -n auto --dist loadscope --no-loadscope-reorder "$@"
