#!/usr/bin/env bash
# The speed table: install, then python -m m3dt.bench (options passed on, e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec .venv/bin/python -m m3dt.bench "$@"
