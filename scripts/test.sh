#!/usr/bin/env bash
# Install, then run the test suite (CPU, no downloads). Options are passed on to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export MUJOCO_GL=${MUJOCO_GL:-disable} WANDB_MODE=${WANDB_MODE:-offline}
exec .venv/bin/python -m pytest -q "$@"
