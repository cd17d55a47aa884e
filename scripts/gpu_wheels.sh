#!/usr/bin/env bash
# Gather, on a machine that reaches PyPI, the wheels scripts/gpu_check.sh installs on a GPU machine that reaches
# no package registry. They go to .whl/ (git-ignored), which travels with the working tree (64 MiB in all).
#
#   scripts/gpu_wheels.sh          # download / build into .whl/, slim bitsandbytes, print the total size
#   scripts/gpu_wheels.sh --list   # print the pinned name==version list, one a line (tests read it)
#
# The GPU image (Python 3.12, torch 2.11+cu130) already holds what IMAGE lists; what it lacks is WHEELS, pinned to
# the versions this project's .venv tests with. bitsandbytes ships compiled kernels for every CUDA it supports
# (43 MB); only the CUDA 13 builds (torch 2.11+cu130 loads libbitsandbytes_cuda130.so) and the CPU one are kept.
set -euo pipefail
cd "$(dirname "$0")/.."

# In the GPU image (docs: /work/.library/device/KINDS.md, read 2026-11-17); never carried.
IMAGE=(torch transformers peft accelerate safetensors sentencepiece tokenizers tiktoken tqdm matplotlib numpy
       pyyaml pandas pyarrow xxhash fsspec huggingface-hub jinja2 requests pillow psutil packaging typing-extensions
       filelock attrs pytest pytest-xdist)
# What the image lacks: our dependencies (pyproject.toml), the oracles the CUDA tests and benches use (trl,
# bitsandbytes), and what those import at run time (checked here: `import mistral_train.tokenizer, trl, datasets`).
WHEELS=(
  hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
  mistral-common==1.13.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  pydantic-extra-types==2.11.1 pycountry==26.2.16
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  torch-optimi==0.3.3 torchao==0.18.0
  trl==1.16.0 bitsandbytes==0.50.2
)
BUILT=(antlr4-python3-runtime)  # an sdist only on PyPI: built here into a pure-Python wheel
DEST=.whl
LIMIT_MIB=64

if [ "${1:-}" = "--list" ]; then
  printf '%s\n' "${WHEELS[@]}"
  exit 0
fi
if [ "${1:-}" = "--image" ]; then
  printf '%s\n' "${IMAGE[@]}"
  exit 0
fi
[ $# -eq 0 ] || { echo "scripts/gpu_wheels.sh: unknown argument '$1'; expected none, --list or --image" >&2; exit 2; }

PY=${PYTHON:-.venv/bin/python}
TAGS=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64)
mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two stop the whole install
for spec in "${WHEELS[@]}"; do
  name=${spec%%==*}
  if [[ " ${BUILT[*]} " == *" $name "* ]]; then
    "$PY" -m pip wheel -q --no-deps -w "$DEST" "$spec"
  else
    "$PY" -m pip download -q --no-deps --only-binary=:all: "${TAGS[@]}" -d "$DEST" "$spec"
  fi
done

# bitsandbytes: keep the CUDA 13 kernels and the CPU library; RECORD rewritten to list what stays.
"$PY" - "$DEST" <<'EOF'
import sys, zipfile
from pathlib import Path

dest = Path(sys.argv[1])
(wheel,) = dest.glob("bitsandbytes-*.whl")
keep = ("libbitsandbytes_cuda13", "libbitsandbytes_cpu")
slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as out:
    dropped = {i.filename for i in src.infolist()
               if "/libbitsandbytes_" in i.filename and not any(k in i.filename for k in keep)}
    for info in src.infolist():
        if info.filename in dropped:
            continue
        data = src.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"".join(line + b"\n" for line in data.splitlines() if line.split(b",")[0].decode() not in dropped)
        out.writestr(info, data)
slim.replace(wheel)
print(f"gpu_wheels: {wheel.name}: dropped {len(dropped)} kernel libraries (other CUDA/ROCm builds)")
EOF

total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "gpu_wheels: $(ls "$DEST"/*.whl | wc -l) wheels in $DEST, $((total / 1048576)) MiB (the working tree travels with them: $LIMIT_MIB MiB in all)"
[ "$total" -lt $((LIMIT_MIB * 1048576)) ] || { echo "gpu_wheels: $DEST is over $LIMIT_MIB MiB" >&2; exit 1; }
