#!/usr/bin/env bash
# The main job on the built-in default: install, collect a 10-task Meta-World suite, run every stage,
# evaluate in the simulator and print the score table. Options are passed on (e.g. --backbone_steps 20000).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec .venv/bin/python -m m3dt.demo "$@"
