#!/usr/bin/env bash
# Create ./.venv (if missing) and install mistral-train into it.
# Usage: scripts/setup_env.sh [EXTRAS]   e.g. scripts/setup_env.sh dev,tracking
# torch is pinned and installed first: any other torch spec may pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
target="."
[ -n "$extras" ] && target=".[$extras]"
# Repeat the torch pin so no dependency upgrades it.
.venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH_SPEC" -e "$target"
