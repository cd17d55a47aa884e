#!/usr/bin/env bash
# The whole test suite: install the package with its test oracles, then run pytest.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/oracle -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh dev,tracking >/dev/null
exec .venv/bin/python -m pytest -n 2 -q "$@"
