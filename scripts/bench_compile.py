"""Compiled blocks, compiled decode, saved-activation bytes per checkpoint policy; bench_model.py's ARCH.

On a shared 2-core machine, wall time depends on other processes. Each timed call records
the CPU-pressure stall (PSI `some` total, /proc/pressure/cpu) it overlapped; calls stalled
for more than --max-stall of their time are counted as contended and reported apart. Sides
go round-robin until each has --clean uncontended calls or --minutes run out.

    python scripts/bench_compile.py [--clean 5] [--minutes 20] [--skip train,decode,bytes]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "model"))  # SavedBytes: the counter the checkpointing tests use
from _bench_common import ARCH, THREADS  # noqa: E402  (the ARCH of scripts/bench_model.py)
from mistral_train import Mistral, MistralConfig  # noqa: E402
from mistral_train.generate import generate  # noqa: E402
from test_checkpointing import SavedBytes  # noqa: E402

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


def summary(name: str, runs: list, max_stall: float, work: float, unit: str) -> str:
    ok = [w for w, st in runs if st <= max_stall]
    allw = [w for w, _ in runs]
    best = min(allw)
    med = f"median of {len(ok)} uncontended calls {work / statistics.median(ok):.1f} {unit}" if ok else "no uncontended call"
    return (f"{name}: {med}; best {work / best:.1f} {unit}; all calls (s, stall share): "
            + ", ".join(f"{w:.2f}/{st:.2f}" for w, st in runs))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--clean", type=int, default=5)
    p.add_argument("--minutes", type=float, default=20)
    p.add_argument("--max-stall", type=float, default=0.1)
    p.add_argument("--skip", default="")
    args = p.parse_args()
    skip = set(args.skip.split(","))
    torch.set_num_threads(THREADS)
    print(f"load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    eager = build()
    ids = torch.randint(0, ARCH["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    deadline = time.time() + args.minutes * 60
    if "train" not in skip:
        sides = {"eager": eager}
        for name, dynamic in (("compiled (dynamic=True, default)", True), ("compiled (dynamic=None)", None)):
            model = build()
            model.set_compile(True, dynamic=dynamic)
            t0 = time.perf_counter(); loss = train_step(model, ids)
            print(f"{name}: first step (compile included) {time.perf_counter() - t0:.1f} s, loss {loss:.6f}", flush=True)
            sides[name] = model
        print(f"eager first step: loss {train_step(eager, ids):.6f}", flush=True)
        for side in sides.values():  # one more warm-up each
            train_step(side, ids)
        runs = race({n: (lambda m=m: train_step(m, ids)) for n, m in sides.items()}, args.clean, args.max_stall,
                    deadline)
        for n, r in runs.items():
            print("train step " + summary(n, r, args.max_stall, BATCH * SEQ, "tok/s"), flush=True)
        del sides, runs
    if "decode" not in skip:
        eager.eval().zero_grad(set_to_none=True)
        prompt = torch.randint(0, ARCH["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(1))
        t0 = time.perf_counter(); out_c = generate(eager, prompt, NEW_TOKENS, stop_at_eos=False, compile=True)
        print(f"first compiled decode call (compile included): {time.perf_counter() - t0:.1f} s", flush=True)
        out_e = generate(eager, prompt, NEW_TOKENS, stop_at_eos=False)
        print(f"identical greedy tokens: {torch.equal(out_c, out_e)}", flush=True)
        sides = {f"compile={flag}": (lambda flag=flag: generate(eager, prompt, NEW_TOKENS, stop_at_eos=False, compile=flag))
                 for flag in (False, True)}
        runs = race(sides, args.clean, args.max_stall, max(deadline, time.time() + 300))
        for n, r in runs.items():
            print(f"decode {n}: " + summary(n, r, args.max_stall, NEW_TOKENS, "new tok/s"), flush=True)
    if "bytes" not in skip:
        eager.train()
        for policy, every in [("none", 1), ("attention", 1), ("mlp", 1), ("every_k", 2), ("block", 1)]:
            eager.set_gradient_checkpointing(policy, every=every)
            counter = SavedBytes()
            eager.zero_grad(set_to_none=True)
            with counter:
                loss = eager(ids, labels=ids)
            loss.backward()
            print(f"saved activations, policy {policy} every {every}: {counter.nbytes / 2**20:.1f} MiB", flush=True)
        eager.set_gradient_checkpointing(False)
        eager.set_activation_offloading(True)
        eager.activation_offload.copy_on_cpu = True  # count what a GPU run would move
        eager.zero_grad(set_to_none=True)
        eager(ids, labels=ids).backward()
        s = eager.activation_offload.stats
        print(f"offloading (policy none, min_bytes 256 KiB): offloaded {s.offloaded_bytes / 2**20:.1f} MiB, "
              f"shared {s.shared_bytes / 2**20:.1f} MiB, kept {s.kept_bytes / 2**20:.1f} MiB", flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
