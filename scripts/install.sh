#!/usr/bin/env bash
# Create .venv with the pinned requirements; a rerun with unchanged requirements.txt does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/requirements.sha256
wanted=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    echo "installing the pinned requirements into .venv (about a minute)..."
    if ! .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt > .venv/install.log 2>&1; then
        cat .venv/install.log >&2
        exit 1
    fi
    echo "$wanted" > "$stamp"
fi
