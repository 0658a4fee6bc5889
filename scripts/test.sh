#!/usr/bin/env bash
# Install, then run the test suite (CPU, no downloads). Options are passed on to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec .venv/bin/python -m pytest -q "$@"
