"""Run the whole benchmark suite in one command; write docs/benchmarks.md and docs/img/*.png from what it measured.

Benches (each a script that also runs alone; each compares ours with the peer in the same run):
  model  bench_model.py: full training step at seq 512 x batch 4 and 2048 x batch 2 vs transformers,
         greedy decode vs transformers' generate
  lora   bench_lora.py: LoRA and QLoRA steps at seq 512 and 2048 vs transformers + peft (+ bitsandbytes)
  dpo    bench_dpo.py: a DPO step at seq 1024 vs trl.DPOTrainer, per reference kind, checkpointing off and on
  sft    bench_sft.py: one SFT epoch end to end, ours packed vs trl.SFTTrainer defaults and with its packing
  compile  bench_compile.py: compiled vs eager blocks and decode step, saved bytes per checkpointing policy (CPU)
  dist   bench_dist.py: 1 vs 2 CPU processes, DDP and DeepSpeed ZeRO-2: scaling efficiency (CPU)
  moe    bench_moe.py: a Mixtral (8 experts, top-2) training step vs transformers' MixtralForCausalLM
         (its default grouped_mm experts and its eager loop)
  grpo   bench_grpo.py: one GRPO step (generation, rewards, update) vs trl.GRPOTrainer with transformers'
         generation, the time split between the parts
  generate  bench_generate.py: batch 32 top_p sampling vs transformers' generate, greedy batch 1 vs the
         bandwidth floor (CPU)
bf16 (issue 18 item 1): on a CPU with bf16 units (avx512_bf16 or amx_bf16), model, lora, dpo and sft run
again with --precision bf16-autocast and --precision bf16 (scripts/_bench_precision.py); on one without,
those rows say they were skipped and why. The bf16 matmul peak is measured beside the fp32 one.
The machine's matmul peak (a large fp32 sgemm on CPU, bf16 on CUDA, best of several) is measured
before every bench and at the end of the run; MFU = tokens/s x model FLOPs per token / the highest
of those (other load only ever lowers a measurement).
GPU section: when torch.cuda.is_available(), every bench runs again with --device cuda (bf16,
flash-attn for transformers when installed, bitsandbytes' CUDA kernels, torch.cuda.max_memory_allocated);
otherwise the report says it was not run.

    python scripts/bench_all.py                    # everything -> docs/benchmarks.md, docs/img/
    python scripts/bench_all.py --quick            # tiny sizes, 1 step: a smoke test -> outputs/bench-quick/
    python scripts/bench_all.py --only lora,dpo    # some benches (the report covers what ran)
    python scripts/bench_all.py --only dist --merge  # rerun some; keep the others from docs/benchmarks.json
    python scripts/bench_all.py --report-only      # rewrite the report from docs/benchmarks.json
    python scripts/bench_all.py --gpu-only --size 1b --only model --out DIR  # GPU section alone (scripts/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared bench helpers beside this file
import _bench_common as mem  # noqa: E402
import _bench_precision as precision  # noqa: E402
import bench_report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BENCHES = ("model", "lora", "dpo", "sft", "compile", "dist", "moe", "grpo", "generate")
PEAK_KEYS = ("peaks", "peak_gflops", "peaks_bf16", "peak_gflops_bf16")  # a section's entries that are not runs
# ours against ours (compiled vs eager, 1 vs 2 processes), and generate (its targets are CPU ones): no CUDA run
CPU_ONLY = ("compile", "dist", "generate")


def runs(name: str, quick: bool) -> list[tuple[str, list[str]]]:
    """(label, script argv) of each run of bench `name`."""
    if name == "model":
        seqs = ((64, 2), (128, 2)) if quick else ((512, 4), (2048, 2))
        # decode once (at the first size); eager attention only at the first size (it adds nothing at 2048)
        # checkpointing on both sides at the longest length, where activations dominate the peak
        default = [(f"model-{seq}", ["bench_model.py", "--seq", str(seq), "--batch", str(batch)]
                    + ([] if i == 0 else ["--no-decode", "--no-eager", "--checkpointing"])) for i, (seq, batch) in enumerate(seqs)]
    else:
        default = [(name, [f"bench_{name}.py"])]
    return [run for label, argv in default for run in [(label, argv), *precision.precision_runs(name, label, argv, quick)]]


def run_bench(argv: list[str], device: str, quick: bool) -> dict:
    """Run one bench script; its JSON payload plus its markdown, or {"error": ...} (never a guessed figure)."""
    command = [sys.executable, str(ROOT / "scripts" / argv[0]), *argv[1:], "--device", device] + (["--quick"] if quick else [])
    print(f"[bench_all] {' '.join(command[1:])}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)  # stderr: progress, straight through
    lines = done.stdout.splitlines()
    payloads = [line[len(mem.JSON_PREFIX):] for line in lines if line.startswith(mem.JSON_PREFIX)]
    if done.returncode != 0 or not payloads:
        tail = "\n".join(lines[-5:])
        return {"error": f"`{' '.join(['python', 'scripts/' + argv[0], *command[2:]])}` exited with {done.returncode} "
                         f"after {time.perf_counter() - started:.0f} s without a result" + (f"; last output: {tail}" if tail else "")}
    payload = json.loads(payloads[-1])
    payload["markdown"] = "\n".join(line for line in lines if not line.startswith(mem.JSON_PREFIX)).strip()
    return payload


def matmul_peak(device: str, quick: bool, dtype: torch.dtype | None = None) -> dict:
    """Best GFLOP/s of an n x n matmul (default: fp32 on CPU, bf16 on CUDA) on THREADS threads: the machine's
    dense-matmul peak as torch reaches it, measured in this run."""
    torch.set_num_threads(mem.THREADS)
    dtype = dtype or mem.compute_dtype(device)
    n, repeats = (1024, 3) if quick else ((8192, 20) if device == "cuda" else (4096, 6))
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mem.timed(lambda: a @ b, device)  # warm-up: thread pool, allocator, kernel selection
    times = [mem.timed(lambda: a @ b, device)[0] for _ in range(repeats)]
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "repeats": repeats,
            "gflops": 2 * n**3 / min(times) / 1e9, "median_gflops": 2 * n**3 / sorted(times)[len(times) // 2] / 1e9}


def section(device: str, names: list[str], quick: bool) -> dict:
    """Every run of `names` on `device`, with the matmul peak measured before each and at the end (on a CPU
    with bf16 units the bf16 peak too); bf16 runs on a CPU without them are recorded as skipped, with why."""
    results, peaks, peaks_bf16 = {}, [], []
    support = mem.bf16_support(device=device)
    bf16_peaks = device == "cpu" and support["bf16"]  # on CUDA the default peak is already bf16
    for name in names:
        for label, argv in runs(name, quick):
            if "--precision" in argv and device != "cpu":
                continue  # on CUDA the default runs already train in bf16 (issue 18 item 1 is about CPUs)
            if "--precision" in argv and not support["bf16"]:
                results[label] = {"skipped": mem.bf16_skipped(support)}
                continue
            peaks.append(matmul_peak(device, quick))
            if bf16_peaks:
                peaks_bf16.append(matmul_peak(device, quick, torch.bfloat16))
            results[label] = run_bench(argv, device, quick)
    peaks.append(matmul_peak(device, quick))
    bf16 = {}
    if bf16_peaks:
        peaks_bf16.append(matmul_peak(device, quick, torch.bfloat16))
        bf16 = {"peaks_bf16": peaks_bf16, "peak_gflops_bf16": max(p["gflops"] for p in peaks_bf16)}
    return {"peaks": peaks, "peak_gflops": max(p["gflops"] for p in peaks), **bf16, **results}


def merged(new: dict, previous_json: Path) -> dict:
    """`new` plus, per device, the runs of the benches it did not rerun, taken from an earlier benchmarks.json.
    The matmul peaks of both runs are kept, so MFU divides by the highest either measured."""
    if not previous_json.is_file():
        raise SystemExit(f"--merge: {previous_json} does not exist; run the whole suite first")
    old = json.loads(previous_json.read_text())
    if old.get("quick") != new["quick"]:
        raise SystemExit(f"--merge: {previous_json} is {'a quick' if old.get('quick') else 'a full'} run; merge like with like")
    rerun = {label for name in new["benches"] for label, _ in runs(name, new["quick"])}
    for device in ("cpu", "cuda"):
        if "not_run" in old.get(device, {"not_run": True}):
            continue
        if "not_run" in new[device]:  # e.g. rerun on a machine without a GPU: the earlier GPU figures stay
            new[device] = old[device]
            continue
        kept = {label: r for label, r in old[device].items() if label not in PEAK_KEYS and label not in rerun}
        peaks = old[device]["peaks"] + new[device]["peaks"]
        peaks_bf16 = old[device].get("peaks_bf16", []) + new[device].get("peaks_bf16", [])
        bf16 = {"peaks_bf16": peaks_bf16, "peak_gflops_bf16": max(p["gflops"] for p in peaks_bf16)} if peaks_bf16 else {}
        new[device] = {"peaks": peaks, "peak_gflops": max(p["gflops"] for p in peaks), **bf16, **kept,
                       **{k: v for k, v in new[device].items() if k not in PEAK_KEYS}}
    earlier = [n for n in old.get("benches", []) if n not in new["benches"]]
    new["benches"] = earlier + new["benches"]
    # where each kept bench was measured: the run that wrote the file, or the one it had kept it from
    source = {"command": old["run"]["command"], "date": old["run"]["date"]}
    new["kept"] = {n: old.get("kept", {}).get(n, source) for n in earlier}
    return new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 step per side: a smoke test of the suite")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHES)}")
    parser.add_argument("--out", type=Path, help="folder for benchmarks.md, benchmarks.json and img/ "
                                                  "(default docs/; outputs/bench-quick/ with --quick)")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU section even when CUDA is available")
    parser.add_argument("--gpu-only", action="store_true", help="skip the CPU section (scripts/gpu_check.sh)")
    parser.add_argument("--size", choices=tuple(mem.SIZES), default="small",
                        help="the model of the model/lora/dpo/sft benches: small (hidden 512, 8 layers) or 1b "
                             "(hidden 2048, 16 layers, ~0.85B; the GPU run of scripts/gpu_check.sh)")
    parser.add_argument("--merge", action="store_true", help="keep the results of the benches not rerun from the "
                                                             "existing benchmarks.json (each section keeps its own command and date)")
    parser.add_argument("--report-only", action="store_true", help="measure nothing: rewrite benchmarks.md and the "
                                                                   "plots from the existing benchmarks.json")
    args = parser.parse_args()
    out = args.out or ROOT / ("outputs/bench-quick" if args.quick else "docs")
    if args.report_only:
        written = bench_report.write(json.loads((out / "benchmarks.json").read_text()), out)
        print("\n".join(f"[bench_all] wrote {path}" for path in written), file=sys.stderr)
        return
    names = args.only.split(",") if args.only else list(BENCHES)
    unknown = sorted(set(names) - set(BENCHES))
    if unknown:
        raise SystemExit(f"--only: unknown bench {unknown}; expected some of {list(BENCHES)}")
    if args.gpu_only and (args.no_gpu or not torch.cuda.is_available()):
        raise SystemExit("--gpu-only: " + ("--no-gpu skips the only section left" if args.no_gpu else
                                           "torch.cuda.is_available() is False on this machine"))
    os.environ["BENCH_SIZE"] = args.size  # read by _bench_common.ARCH in every bench process started below
    clock = mem.RunClock(__file__)
    cpu = {"not_run": "the CPU section was skipped (--gpu-only)"} if args.gpu_only else section("cpu", names, args.quick)
    results = {"quick": args.quick, "benches": names, "cpu": cpu}
    gpu_names = [n for n in names if n not in CPU_ONLY]
    if args.no_gpu:
        results["cuda"] = {"not_run": "the GPU section was skipped (--no-gpu)"}
    elif not torch.cuda.is_available():
        results["cuda"] = {"not_run": f"no GPU: torch.cuda.is_available() is False on this machine (torch "
                                      f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); "
                                      "scripts/gpu_check.sh runs it on a CUDA machine"}
    else:
        results["cuda"] = section("cuda", gpu_names, args.quick)
    results["run"] = clock.finish()
    if args.merge:
        results = merged(results, out / "benchmarks.json")
    written = bench_report.write(results, out)
    failed = [f"{device}/{label}" for device in ("cpu", "cuda") for label, r in results[device].items()
              if isinstance(r, dict) and "error" in r]
    print("\n".join(f"[bench_all] wrote {path}" for path in written), file=sys.stderr)
    if failed:
        raise SystemExit(f"[bench_all] failed: {failed} (the report says so; see the output above)")


if __name__ == "__main__":
    main()
