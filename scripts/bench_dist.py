"""Benchmark multi-process training throughput on CPU: 1 vs 2 processes, DDP and DeepSpeed ZeRO-2.

Every side is a real run of the command line (`python -m mistral_train`, or `accelerate launch
--config_file configs/accelerate/{cpu_ddp,zero2}.yaml`) on the same model (Mistral shape ratios, the real
32000 vocabulary), on packed rows of the bundled text, fp32, one intra-op thread per process, the same
micro-batch per process (so 2 processes train twice the rows per step: weak scaling). Throughput is
metrics.jsonl's tokens_per_s (every process's tokens, per second of training step, evaluation and
checkpoints excluded) averaged over the steps after WARMUP. Sides run round-robin, `--repeats` times,
and the median is reported, so a busy moment on a shared machine hits every side alike.

    scaling efficiency = tokens/s of 2 processes / (2 x tokens/s of 1 process of the same engine)

A 1-process, 2-thread side shows what the same two cores give without a second process.
Prints a markdown block, then one line `BENCH_JSON {...}`.

    python scripts/bench_dist.py [--steps 12] [--repeats 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WARMUP = 4  # steps excluded from the average (first steps: allocator, DeepSpeed buckets, lazy init)
MODEL = ["model.hidden_size=256", "model.intermediate_size=768", "model.num_hidden_layers=4",
         "model.num_attention_heads=4", "model.num_key_value_heads=2"]
QUICK_MODEL = ["model.hidden_size=64", "model.intermediate_size=192", "model.num_hidden_layers=2",
               "model.num_attention_heads=4", "model.num_key_value_heads=2"]
# (label, launcher config or None for a plain process, processes, threads per process)
SIDES = [("one process", None, 1, 1), ("one process, 2 threads", None, 1, 2), ("DDP x1", "cpu_ddp", 1, 1),
         ("DDP x2", "cpu_ddp", 2, 1), ("ZeRO-2 x1", "zero2", 1, 1), ("ZeRO-2 x2", "zero2", 2, 1)]


def _port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def run_side(config, processes: int, threads: int, args: list[str], runs: Path, name: str) -> float:
    """Train one side; return its tokens/s after the warm-up steps."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="", WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    if config is None:
        launcher = [sys.executable, "-m", "mistral_train"]
    else:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(REPO / "configs" / "accelerate" / f"{config}.yaml"), "--num_processes", str(processes),
                    "--main_process_port", _port(), "-m", "mistral_train"]
    command = [*launcher, *args, f"run.dir={runs}", f"run.name={name}"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name}: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    measured = [row["tokens_per_s"] for row in rows if row["step"] > WARMUP and "tokens_per_s" in row]
    return statistics.fmean(measured)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="rows per micro-batch and process")
    parser.add_argument("--quick", action="store_true", help="a tiny model and 8 steps: checks the script runs")
    parser.add_argument("--device", default="cpu", choices=("cpu",), help="CPU processes over gloo (bench_all passes it)")
    options = parser.parse_args()
    steps = 8 if options.quick else options.steps
    args = ["recipe=tiny_pretrain", *(QUICK_MODEL if options.quick else MODEL), f"trainer.max_seq_len={options.seq}",
            f"trainer.batch_size={options.batch}", "trainer.grad_accum_steps=1", f"trainer.max_steps={steps}",
            f"trainer.log_every={WARMUP}", "trainer.warmup_steps=2", "trainer.device=cpu", "trainer.precision=fp32",
            "trainer.sample_max_new_tokens=1", "tracking.progress_bar=false", "tracking.plot=false"]
    results: dict[str, list[float]] = {label: [] for label, *_ in SIDES}
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(options.repeats):
            for i, (label, config, processes, threads) in enumerate(SIDES):
                results[label].append(run_side(config, processes, threads, args, Path(folder), f"side{i}_{repeat}"))
                print(f"{label:24s} repeat {repeat + 1}: {results[label][-1]:8.0f} tokens/s", file=sys.stderr)
    median = {label: statistics.median(values) for label, values in results.items()}
    efficiency = {"DDP": median["DDP x2"] / (2 * median["DDP x1"]),
                  "ZeRO-2": median["ZeRO-2 x2"] / (2 * median["ZeRO-2 x1"])}
    print(f"- Multi-process training throughput on CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), "
          f"gloo backend; command `python scripts/{Path(__file__).name} {' '.join(sys.argv[1:])}`, "
          f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}.")
    print(f"- Model: {' '.join(QUICK_MODEL if options.quick else MODEL)}, vocab 32000, fp32; packed rows of "
          f"{options.seq} tokens, {options.batch} rows per micro-batch and process, {steps} steps "
          f"(mean over steps {WARMUP + 1}-{steps}), median of {options.repeats} runs.\n")
    print("| side | processes x threads | tokens/s |\n|---|---|---|")
    for label, config, processes, threads in SIDES:
        print(f"| {label} | {processes} x {threads} | {median[label]:.0f} |")
    print(f"\nScaling efficiency (2 processes vs 2 x 1 process, same engine): DDP {efficiency['DDP']:.0%}, "
          f"ZeRO-2 {efficiency['ZeRO-2']:.0%}. Wall time {time.monotonic() - began:.0f} s.")
    print("BENCH_JSON " + json.dumps({"bench": "dist", "tokens_per_s": median, "efficiency": efficiency,
                                      "runs": results, "steps": steps, "seq": options.seq, "batch": options.batch}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
