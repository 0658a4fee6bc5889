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
# Videos (m3dt.evaluate --video) render with MuJoCo's OSMesa backend on a machine without a GPU; Debian and
# Ubuntu ship it as libosmesa6. Installed when missing and possible (root with apt), else a note.
if ! { ldconfig -p 2>/dev/null || /sbin/ldconfig -p; } | grep -q "libOSMesa\.so"; then
    if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
        echo "installing libosmesa6 (OpenGL in software, for videos)..."
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                libosmesa6; } > .venv/apt.log 2>&1; then
            echo "warning: apt-get could not install libosmesa6 (.venv/apt.log); videos need it on a CPU" >&2
        fi
    else
        echo "note: libOSMesa is missing; videos (--video) need it on a CPU: sudo apt-get install libosmesa6" >&2
    fi
fi
