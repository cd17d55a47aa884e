#!/usr/bin/env bash
# The GPU run of issue 18 item 5, on one CUDA machine that reaches no package registry, within 8 minutes:
#   1. install the carried wheels (.whl/, gathered beforehand by scripts/gpu_wheels.sh where PyPI is reachable)
#      with pip --no-index into a folder of their own: never a download, the image's packages untouched
#   2. run tests/cuda by name (the normal suite never collects it): bitsandbytes kernels, FlexAttention /
#      flash-attn against SDPA, bf16 steps against fp32, paged optimizers
#   3. run bench_all's GPU section on the ~0.85B Mistral (--gpu-only --size 1b): ours vs transformers (FA2 when
#      flash-attn imports, else SDPA: the report says which) / peft / trl, tokens/s and max_memory_allocated;
#      one bench at a time, each given what is left of the time budget, merged into one report
#   4. write the GPU section of docs/benchmarks.md and docs/benchmarks.json (scripts/gpu_section.py), naming
#      the GPU as torch.cuda.get_device_name gives it
#
#   scripts/gpu_check.sh                   # the whole run
#   scripts/gpu_check.sh --dry-run         # print the steps; run nothing (any machine)
#   scripts/gpu_check.sh --no-bench        # steps 1-2 only
#   scripts/gpu_check.sh --copy-to DIR     # also copy the docs it wrote and its logs to DIR (a lent machine's $OUT)
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 450: the benches stop being started when
# it is spent, leaving room under 8 minutes for the report), GPU_CHECK_BENCHES (default "model lora dpo sft").
# Exit status: 0 all passed; 1 a CUDA test failed; 2 cannot run here (no CUDA, no wheels, an import fails);
# 3 a bench failed or did not fit in the budget (the report says which).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WHEELS=.whl
SITE=${GPU_CHECK_SITE:-/tmp/mistral-train-site}
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
read -r -a BENCHES <<<"${GPU_CHECK_BENCHES:-model lora dpo sft}"
MEASURED=outputs/gpu-check
DRY=0 BENCH=1 COPY_TO=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --no-bench) BENCH=0 ;;
    --copy-to) COPY_TO=${2:?--copy-to needs a folder}; shift ;;
    *) echo "gpu_check: unknown argument '$1'; expected --dry-run, --no-bench or --copy-to DIR" >&2; exit 2 ;;
  esac
  shift
done

say() { echo "[gpu_check $(printf '%3d' "$SECONDS") s] $*" >&2; }
step() {  # print a step; run it unless --dry-run
  echo "+ $*" >&2
  [ "$DRY" = 1 ] || "$@"
}

# ---- 0. a CUDA GPU and the carried wheels
if [ "$DRY" = 0 ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    say "no CUDA GPU: torch does not import or torch.cuda.is_available() is False for $PY; run this on a CUDA machine"; exit 2; }
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || {
    say "no wheels in $WHEELS/: run scripts/gpu_wheels.sh where PyPI is reachable and carry $WHEELS"; exit 2; }
  rm -rf "$MEASURED" && mkdir -p "$MEASURED"
fi

# ---- 1. install, offline
mapfile -t PINNED < <(scripts/gpu_wheels.sh --list)
step "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" "${PINNED[@]}" || { say "the offline install failed (above)"; exit 2; }
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
step "$PY" -c "import mistral_train, trl, peft, transformers, bitsandbytes, mistral_common, hydra, optimi, torchao, datasets" \
  || { say "an import fails after the install (above)"; exit 2; }
ATTN="attention backends: decided on the GPU machine (dry run)"
[ "$DRY" = 1 ] || ATTN=$("$PY" -c "
import importlib.util, torch
fa = importlib.util.find_spec('flash_attn') is not None
print(f'GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__} (CUDA {torch.version.cuda}); '
      + ('flash-attn installed: transformers runs flash_attention_2, our packed rows flash-attn varlen' if fa else
         'flash-attn not installed: transformers runs sdpa, our packed rows FlexAttention'))
")
say "$ATTN"

# ---- 2. the CUDA tests
if [ "$DRY" = 1 ]; then
  step "$PY" -m pytest -p no:cacheprovider -q -rA tests/cuda --junitxml "$MEASURED/cuda-tests.xml"
  TESTS_RC=0
else
  step "$PY" -m pytest -p no:cacheprovider -q -rA tests/cuda --junitxml "$MEASURED/cuda-tests.xml" \
    2>&1 | tee "$MEASURED/cuda-tests.log" >&2
  TESTS_RC=${PIPESTATUS[0]}
fi
TESTS_LINE=$(tail -n 1 "$MEASURED/cuda-tests.log" 2>/dev/null | tr -d '=' | xargs)
say "tests/cuda: ${TESTS_LINE:-not run} (exit $TESTS_RC)"

# ---- 3. bench_all's GPU section, bench by bench within the budget
BENCH_RC=0 SKIPPED=()
if [ "$BENCH" = 1 ]; then
  for bench in "${BENCHES[@]}"; do
    left=$((BUDGET_S - SECONDS))
    if [ "$left" -lt 30 ]; then SKIPPED+=("$bench"); BENCH_RC=3; continue; fi
    merge=()  # the first bench to finish writes the report; each later one merges into it
    { [ -f "$MEASURED/benchmarks.json" ] || { [ "$DRY" = 1 ] && [ "$bench" != "${BENCHES[0]}" ]; }; } && merge=(--merge)
    step timeout "$left" "$PY" scripts/bench_all.py --gpu-only --size 1b --only "$bench" --out "$MEASURED" "${merge[@]}" \
      || { say "bench $bench failed or ran out of time (exit $?)"; BENCH_RC=3; }
  done
  [ ${#SKIPPED[@]} -eq 0 ] || say "not started, the ${BUDGET_S} s budget spent: ${SKIPPED[*]}"

  # ---- 4. the GPU section of docs/benchmarks.md
  notes=(--note "$ATTN" --note "tests/cuda: ${TESTS_LINE:-not run} (\`scripts/gpu_check.sh\`)")
  [ ${#SKIPPED[@]} -eq 0 ] || notes+=(--note "Not run within the ${BUDGET_S} s budget: ${SKIPPED[*]}.")
  if [ "$DRY" = 1 ] || [ -f "$MEASURED/benchmarks.json" ]; then
    step "$PY" scripts/gpu_section.py --measured "$MEASURED" "${notes[@]}" || BENCH_RC=3
  else
    say "no bench finished: docs/benchmarks.md left as it was"; BENCH_RC=3
  fi
fi

if [ -n "$COPY_TO" ] && [ "$DRY" = 0 ]; then
  mkdir -p "$COPY_TO"
  cp docs/benchmarks.md docs/benchmarks.json "$MEASURED"/cuda-tests.log "$MEASURED"/cuda-tests.xml "$COPY_TO"/ 2>/dev/null
  cp docs/img/*_cuda*.png "$COPY_TO"/ 2>/dev/null
fi
say "done: tests exit $TESTS_RC, benches exit $BENCH_RC"
[ "$TESTS_RC" = 0 ] || exit 1
exit "$BENCH_RC"
