#!/usr/bin/env bash
# The main job: install what it needs, then run the default recipe (a tiny Mistral on the bundled data, CPU).
# Extra arguments are passed on as overrides, e.g. scripts/demo.sh trainer.max_steps=50
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh >/dev/null
exec .venv/bin/mistral-train "$@"
