"""Compiled blocks, compiled decode, saved-activation bytes per checkpoint policy; bench_model.py's ARCH.

On a shared 2-core machine, wall time depends on other processes. Each timed call records
the CPU-pressure stall (PSI `some` total, /proc/pressure/cpu) it overlapped; calls stalled
for more than --max-stall of their time are counted as contended and reported apart. Sides
go round-robin until each has --clean uncontended calls or --minutes run out.

Prints a markdown block and a JSON line for bench_all.py.

    python scripts/bench_compile.py [--clean 5] [--minutes 10] [--skip train,decode,bytes] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as mem  # noqa: E402
from _bench_common import ARCH, QUICK_ARCH, THREADS  # noqa: E402  (the ARCH of scripts/bench_model.py)
from mistral_train import Mistral, MistralConfig  # noqa: E402
from mistral_train.generate import generate  # noqa: E402
from mistral_train.model.saved_bytes import SavedBytes  # noqa: E402

BATCH, SEQ, PROMPT, NEW_TOKENS = 4, 512, 32, 128


def stall_us() -> int:
    return int(Path("/proc/pressure/cpu").read_text().split()[4].split("=")[1])


def timed(fn) -> tuple[float, float]:
    """(wall seconds, share of it some task stalled waiting for a CPU)."""
    s0, t0 = stall_us(), time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    return wall, (stall_us() - s0) / 1e6 / wall


def build(seed=0):
    torch.manual_seed(seed)
    return Mistral(MistralConfig(**ARCH))


def train_step(model, ids):
    model.train().zero_grad(set_to_none=True)
    loss = model(ids, labels=ids)
    loss.backward()
    return loss.item()


def race(sides: dict, clean: int, max_stall: float, deadline: float) -> dict[str, list]:
    """Round-robin calls of every side until each has `clean` uncontended timings or time is up."""
    runs = {s: [] for s in sides}
    r = 0
    while time.time() < deadline and min(sum(st <= max_stall for _, st in v) for v in runs.values()) < clean:
        names = list(sides)
        for s in names[r % len(names):] + names[: r % len(names)]:
            runs[s].append(timed(sides[s]))
        r += 1
    return runs


def figures(runs: list, max_stall: float, work: float) -> dict:
    """Median work/s over the uncontended calls (all calls when none was), best, and every call."""
    clean = [w for w, st in runs if st <= max_stall]
    return {"median": work / statistics.median(clean or [w for w, _ in runs]), "uncontended": len(clean),
            "best": work / min(w for w, _ in runs), "calls": [[round(w, 3), round(st, 3)] for w, st in runs]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clean", type=int, default=5)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--max-stall", type=float, default=0.1)
    p.add_argument("--skip", default="")
    p.add_argument("--device", default="cpu", choices=("cpu",), help="CPU only: the GPU section of bench_model covers CUDA")
    p.add_argument("--quick", action="store_true", help="tiny model, 1 clean call: checks the script runs")
    args = p.parse_args()
    global ARCH, BATCH, SEQ, NEW_TOKENS
    if args.quick:
        ARCH, BATCH, SEQ, NEW_TOKENS, args.clean, args.minutes = QUICK_ARCH, 2, 64, 8, 1, 1
    skip = set(args.skip.split(","))
    torch.set_num_threads(THREADS)
    clock = mem.RunClock(__file__)
    eager = build()
    ids = torch.randint(0, ARCH["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    deadline = time.time() + args.minutes * 60
    result, notes = {"bench": "compile", "device": "cpu", "arch": ARCH, "batch": BATCH, "seq": SEQ}, []
    if "train" not in skip:
        sides, first = {"eager": eager}, {}
        model = build()
        model.set_compile(True)
        t0 = time.perf_counter()
        first["compiled"] = train_step(model, ids)
        compile_s = time.perf_counter() - t0
        sides["compiled"] = model
        first["eager"] = train_step(eager, ids)
        for side in sides.values():  # one more warm-up each
            train_step(side, ids)
        runs = race({n: (lambda m=m: train_step(m, ids)) for n, m in sides.items()}, args.clean, args.max_stall, deadline)
        result["train"] = {n: figures(r, args.max_stall, BATCH * SEQ) for n, r in runs.items()}
        notes.append(f"- Training step (forward + backward, batch {BATCH} x seq {SEQ}, fp32): first compiled step "
                     f"{compile_s:.0f} s (compilation included); first-step losses eager {first['eager']:.6f}, compiled "
                     f"{first['compiled']:.6f}.")
        del sides, runs
    if "decode" not in skip:
        eager.eval().zero_grad(set_to_none=True)
        prompt = torch.randint(0, ARCH["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(1))
        out_c = generate(eager, prompt, NEW_TOKENS, stop_at_eos=False, compile=True)
        out_e = generate(eager, prompt, NEW_TOKENS, stop_at_eos=False)
        sides = {f"compile={flag}": (lambda flag=flag: generate(eager, prompt, NEW_TOKENS, stop_at_eos=False, compile=flag))
                 for flag in (False, True)}
        runs = race(sides, args.clean, args.max_stall, max(deadline, time.time() + (30 if args.quick else 300)))
        result["decode"] = {n: figures(r, args.max_stall, NEW_TOKENS) for n, r in runs.items()}
        notes.append(f"- Greedy decode: batch 1, prompt {PROMPT}, {NEW_TOKENS} new tokens; identical tokens compiled "
                     f"and eager: {'yes' if torch.equal(out_c, out_e) else 'NO'}.")
    if "bytes" not in skip:
        eager.train()
        saved = {}
        for policy, every in [("none", 1), ("attention", 1), ("mlp", 1), ("every_k", 2), ("block", 1)]:
            eager.set_gradient_checkpointing(policy, every=every)
            eager.zero_grad(set_to_none=True)
            with SavedBytes() as counter:
                loss = eager(ids, labels=ids)
            loss.backward()
            saved[f"{policy}" + (f" (every {every})" if every > 1 else "")] = counter.nbytes / 2**20
        eager.set_gradient_checkpointing(False)
        eager.set_activation_offloading(True)
        eager.activation_offload.copy_on_cpu = True  # count what a GPU run would move
        eager.zero_grad(set_to_none=True)
        eager(ids, labels=ids).backward()
        stats = eager.activation_offload.stats
        result["saved_mib"] = saved
        result["offload_mib"] = {"offloaded": stats.offloaded_bytes / 2**20, "shared": stats.shared_bytes / 2**20,
                                 "kept": stats.kept_bytes / 2**20}
    result["run"] = clock.finish()
    mem.emit(report(result, args, notes), result)


def report(result: dict, args: argparse.Namespace, notes: list[str]) -> str:
    arch, info = result["arch"], result["run"]["machine"]
    lines = [f"- Machine: {info['cpu']}, {info['cores']} cores, torch.set_num_threads({THREADS}); Python {info['python']}, "
             f"{mem.versions_text(info)}; fp32.",
             f"- Model: hidden {arch['hidden_size']}, {arch['num_hidden_layers']} layers, {arch['num_attention_heads']} heads, "
             f"{arch['num_key_value_heads']} KV heads, intermediate {arch['intermediate_size']}, vocab {arch['vocab_size']}; "
             "ours only (compiled vs eager is a comparison within our model).",
             f"- Timing: sides alternate until each has {args.clean} calls during which CPU pressure (PSI `some`) "
             f"stalled less than {args.max_stall:.0%} of the call, or {args.minutes:g} min pass; the median is over those "
             "uncontended calls (all calls when none was).", *notes, *mem.run_notes(result["run"]), "",
             "| Measure | eager | compiled | compiled / eager |", "|---|---:|---:|---:|"]
    for key, what, unit in (("train", "Training step", "tokens/s"), ("decode", "Greedy decode", "new tokens/s")):
        if key in result:
            e, c = result[key][list(result[key])[0]], result[key][list(result[key])[1]]
            lines.append(f"| {what}, {unit}, median ({e['uncontended']} / {c['uncontended']} uncontended calls) | "
                         f"{e['median']:.1f} | {c['median']:.1f} | {c['median'] / e['median']:.2f}x |")
            lines.append(f"| {what}, {unit}, best call | {e['best']:.1f} | {c['best']:.1f} | {c['best'] / e['best']:.2f}x |")
    if "saved_mib" in result:
        none = result["saved_mib"]["none"]
        lines += ["", f"Activation memory at batch {BATCH} x seq {SEQ}: bytes autograd saves for backward "
                  "(`mistral_train.model.saved_bytes.SavedBytes`), per `model.gradient_checkpointing` policy:", "",
                  "| policy | saved for backward, MiB | vs none |", "|---|---:|---:|"]
        lines += [f"| {policy} | {mib:.1f} | {mib / none:.2f}x |" for policy, mib in result["saved_mib"].items()]
        off = result["offload_mib"]
        lines += ["", f"Activation offloading (`model.activation_offloading`, no checkpointing, tensors of at least "
                  f"256 KiB): {off['offloaded']:.1f} MiB would move to CPU memory, {off['shared']:.1f} MiB share a "
                  f"storage already moved, {off['kept']:.1f} MiB stay (on this CPU the copy is counted, not timed)."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
