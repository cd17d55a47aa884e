"""What every bench script shares: one child process per side, peak memory, timing, the machine, output.

`ru_maxrss` is a per-process high-water mark, so two sides measured in one process would
share it. A bench script re-runs itself as one child per side; the child builds its model,
resets the mark (Linux `clear_refs` 5; on CUDA `reset_peak_memory_stats`) so the build's
transient copies do not count, then serves commands ("step", "memory", ...) one JSON line
each. The parent sends the commands round-robin over the children, so a busy moment on a
shared machine hits every side alike.

Every script prints a markdown block, then one line `BENCH_JSON {...}` that bench_all.py reads.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

THREADS = 2  # torch threads in every process: the 2-core machine the targets are stated for
JSON_PREFIX = "BENCH_JSON "
# Small enough for a 2-core CPU, with Mistral's shape ratios: GQA 8 query / 2 KV heads,
# intermediate = 3 x hidden, the real 32000 vocabulary. No sliding window, so attention is plain causal.
ARCH = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
            num_attention_heads=8, num_key_value_heads=2, sliding_window=None, max_position_embeddings=4096)
# --quick: the same shape family, tiny (NF4 needs dimensions that are multiples of its block of 64).
QUICK_ARCH = dict(ARCH, hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4)
# bench_all.py --size 1b (scripts/gpu_check.sh's GPU run) sets BENCH_SIZE=1b for every bench it starts, so ARCH
# is then a ~0.85B Mistral (TinyLlama's widths, 16 layers, head_dim 128, 4:1 GQA) wherever a bench reads it.
SIZES = {"small": ARCH, "1b": dict(ARCH, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                                   num_attention_heads=16, num_key_value_heads=4)}
if os.environ.get("BENCH_SIZE", "small") not in SIZES:
    raise SystemExit(f"BENCH_SIZE={os.environ['BENCH_SIZE']}: expected one of {', '.join(SIZES)}")
ARCH = SIZES[os.environ.get("BENCH_SIZE", "small")]
VERSIONED = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets")


# ---- memory and time, in a child


def current_rss_mib() -> float:
    """Resident set size of this process now, in MiB (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmRSS line")


def reset_peak_rss() -> bool:
    """Set this process's high-water mark to its current RSS; False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mib() -> float:
    """Highest RSS of this process (since the last reset), in MiB; ru_maxrss is in KiB on Linux."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pick_device(name: str) -> str:
    """"cpu", "cuda", or "auto" (cuda when torch sees a GPU)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch.cuda.is_available() is False on this machine")
    return name


def compute_dtype(device: str) -> torch.dtype:
    """fp32 on CPU (no bf16 matmul units on the target CPU), bf16 on CUDA."""
    return torch.bfloat16 if device == "cuda" else torch.float32


# ---- precision: what the CPU (or GPU) offers, and what each bench runs in

# fp32: fp32 weights and maths. bf16-autocast: fp32 weights, matmuls under torch.autocast(bf16) on both
# sides. bf16: the weights themselves bf16 on both sides (each side's optimizer as its trainer builds it).
PRECISIONS = ("fp32", "bf16-autocast", "bf16")
# /proc/cpuinfo flags that mean bf16 dot-product units (AVX-512 BF16, AMX): without them oneDNN emulates
# bf16 matmuls through fp32 and bf16 is slower, not faster.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def bf16_support(cpuinfo: str | None = None, device: str = "cpu") -> dict:
    """Whether this machine has bf16 units: on CPU the flags of /proc/cpuinfo (or `cpuinfo`, its text);
    on CUDA torch.cuda.is_bf16_supported(). Returns {"cpu", "bf16", "units", "simd"}: the model name,
    the verdict, the bf16 flags found, and the SIMD flags (avx*, amx*) to name when there are none."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())  # the first processor speaks for all
    flags = fields.get("flags", fields.get("Features", "")).split()  # x86 "flags", ARM "Features"
    units = [f for f in BF16_FLAGS if f in flags]
    simd = [f for f in flags if f.startswith(("avx", "amx"))]
    info = {"cpu": fields.get("model name", "unknown"), "bf16": bool(units), "units": units, "simd": simd}
    if device == "cuda":
        info.update(bf16=torch.cuda.is_bf16_supported(), units=["cuda"] if torch.cuda.is_bf16_supported() else [])
    return info


def bf16_text(support: dict) -> str:
    """The machine line's words for `bf16_support`'s answer."""
    if support["bf16"]:
        return f"bf16 units: yes ({', '.join(support['units'])})"
    return f"bf16 units: none (flags: {' '.join(support['simd']) or 'no avx/amx'})"


def bf16_skipped(support: dict) -> str:
    """What a bf16 row says on a machine without bf16 units."""
    return f"skipped: this CPU has no bf16 units (flags: {' '.join(support['simd']) or 'no avx/amx'})"


def default_precision(device: str) -> str:
    """What a bench runs in without --precision: fp32 on CPU, bf16 weights on CUDA (as before the option)."""
    return "bf16" if device == "cuda" else "fp32"


def weight_dtype(precision: str) -> torch.dtype:
    """The dtype the weights live in under `precision` (one of PRECISIONS)."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return torch.bfloat16 if precision == "bf16" else torch.float32


def autocast(precision: str, device: str) -> Callable[[], contextlib.AbstractContextManager]:
    """Factory of the forward/backward context: bf16 autocast for bf16-autocast, else nothing."""
    if precision == "bf16-autocast":
        return lambda: torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext


def precision_text(precision: str) -> str:
    """How a bench's markdown names the precision it ran in."""
    weight_dtype(precision)  # an unknown name fails here with the option's name
    return {"fp32": "fp32 weights and maths", "bf16-autocast": "fp32 weights, bf16 autocast on both sides",
            "bf16": "pure bf16 weights on both sides"}[precision]


class PeakMemory:
    """Peak memory of this process since `start()`: the RSS high-water mark on CPU,
    `torch.cuda.max_memory_allocated` on CUDA. Call `start()` once the model is built."""

    def __init__(self, device: str) -> None:
        self.device, self.baseline, self.reset_ok = device, 0.0, False

    def start(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline, self.reset_ok = torch.cuda.memory_allocated() / 2**20, True
        else:
            self.reset_ok = reset_peak_rss()  # the load's transient copies must not count
            self.baseline = current_rss_mib()

    def read(self) -> dict:
        peak = torch.cuda.max_memory_allocated() / 2**20 if self.device == "cuda" else peak_rss_mib()
        method = "torch.cuda.max_memory_allocated" if self.device == "cuda" else "RSS high-water mark"
        return {"baseline_mib": self.baseline, "peak_mib": peak, "peak_reset": self.reset_ok, "method": method,
                "threads": torch.get_num_threads()}


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    """(seconds, result) of `fn()`, the device synchronised on both ends."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


# ---- the child protocol


def serve(handlers: dict[str, Callable[[], dict]]) -> None:
    """Child side: answer each command line on stdin with its handler's JSON, until stdin closes.
    Whatever else prints (trl's logs, DeepSpeed's notices) goes to stderr: stdout carries answers only."""
    answers, sys.stdout = sys.stdout, sys.stderr
    print(json.dumps({"ready": True}), file=answers, flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command not in handlers:
            raise ValueError(f"unknown bench command {command!r}; expected one of {sorted(handlers)}")
        print(json.dumps(handlers[command]()), file=answers, flush=True)


class WeightProbe:
    """Whether a step changed the trained weights: a copy of the first PROBE elements of every trainable
    parameter (a few hundred KiB, so the peak memory hardly sees it), compared after each step."""

    PROBE = 4096

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.before = self._read()

    def _read(self) -> list[torch.Tensor]:
        return [p.detach().reshape(-1)[: self.PROBE].clone() for p in self.params]

    def moved(self) -> bool:
        now = self._read()
        moved = any(bool((a != b).any()) for a, b in zip(now, self.before))
        self.before = now
        return moved


def serve_steps(step: Callable[[], float | tuple[float, float]], device: str,
                extra: dict[str, Callable[[], dict]] | None = None, params: list[torch.Tensor] | None = None) -> None:
    """Child side of a training-step bench: peak memory counted from now (the model is built), then
    "step" (one timed call of `step`, which returns the loss, or (loss, gradient norm)) and "memory".
    With `params` (the trained ones) each step's answer also says whether they moved."""
    probe = WeightProbe(params) if params is not None else None
    memory = PeakMemory(device)
    memory.start()

    def one_step() -> dict:
        seconds, out = timed(step, device)
        loss, norm = out if isinstance(out, tuple) else (out, None)
        answer = {"s": seconds, "loss": loss}
        if norm is not None:
            answer["grad_norm"] = float(norm)
        if probe is not None:
            answer["moved"] = probe.moved()
        return answer

    serve({"step": one_step, "memory": memory.read, "profile": lambda: profile_step(step, device), **(extra or {})})


# Kernels that do the step's dense arithmetic: the matmuls of every linear (forward and both backward
# products) and SDPA's fused attention kernels. Their share of the op time bounds what any
# implementation can gain by changing the rest.
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention",
              "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_efficient_attention",
              "aten::_flash_attention_forward", "aten::_flash_attention_backward", "aten::_efficient_attention_forward",
              "aten::_efficient_attention_backward", "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
              "aten::_scaled_dot_product_flash_attention_backward", "aten::_scaled_dot_product_efficient_attention_backward")


def profile_step(step: Callable[[], float], device: str, top: int = 6) -> dict:
    """One more step under torch.profiler and a saved-tensor counter: where its time and memory go.
    Returns the op time (self time summed over ops), the part in MATMUL_OPS, the costliest ops, and the
    bytes saved for backward (distinct storages, parameters excluded)."""
    from torch.profiler import ProfilerActivity, profile

    from mistral_train.model.saved_bytes import SavedBytes

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof, SavedBytes() as saved:
        step()
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    ops = [(e.key, getattr(e, attr) / 1e3) for e in prof.key_averages()]
    total = sum(ms for _, ms in ops)
    matmul = sum(ms for name, ms in ops if name in MATMUL_OPS)
    return {"op_ms": total, "matmul_ms": matmul, "saved_mib": saved.nbytes / 2**20,
            "top_ops": [[name, round(ms, 1)] for name, ms in sorted(ops, key=lambda o: -o[1])[:top]]}


def profile_note(profiles: dict[str, dict]) -> str:
    """The markdown line for the profiles of every side."""
    parts = [f"{side}: {p['matmul_ms'] / p['op_ms']:.0%} of {p['op_ms'] / 1e3:.2f} s op time in matmul/attention "
             f"kernels, {p['saved_mib']:.0f} MiB saved for backward; costliest ops "
             + ", ".join(f"{name} {ms / 1e3:.2f} s" for name, ms in p["top_ops"][:4])
             for side, p in profiles.items()]
    return ("- Profile (one extra step per side after the timed ones, torch.profiler self time per op, and a "
            "saved-tensor hook counting what autograd keeps for backward): " + "; ".join(parts) + ".")


class Child:
    """Parent side: a child process running `python argv...` that ends in `serve(...)`."""

    def __init__(self, argv: list[str], name: str = "") -> None:
        self.argv, self.name = argv, name
        self.process = subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._read()  # {"ready": true} once the model is built

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._read()

    def _read(self) -> dict:
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"bench child {self.argv} exited with {self.process.wait()} before answering")
            try:
                answer = json.loads(line)
            except json.JSONDecodeError:
                answer = None
            if isinstance(answer, dict):
                return answer
            # a library printed to stdout while the model was built: pass it on, it is not an answer
            print(f"[bench child {self.name}] {line.rstrip()}", file=sys.stderr)

    def close(self) -> None:
        self.process.stdin.close()
        if self.process.wait(timeout=300) != 0:  # a saturated shared machine can take minutes to tear torch down
            raise RuntimeError(f"bench child {self.argv} exited with {self.process.returncode}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def children_of(argvs: dict[str, list[str]]) -> Iterator[dict[str, Child]]:
    """One child per side, started together (imports and model builds are not timed: overlap them);
    closed (each must exit 0) when the block ends, killed if it ends with an error."""
    with ThreadPoolExecutor(len(argvs)) as pool:
        futures = {side: pool.submit(Child, argv, side) for side, argv in argvs.items()}
    failed = [side for side, f in futures.items() if f.exception() is not None]
    if failed:
        for f in futures.values():
            if f.exception() is None:
                f.result().kill()
        raise RuntimeError(f"bench children {failed} failed to start") from futures[failed[0]].exception()
    children = {side: f.result() for side, f in futures.items()}
    try:
        yield children
        for child in children.values():
            child.close()
    finally:
        for child in children.values():
            child.kill()


def round_robin(children: dict[str, Child], command: str, rounds: int) -> dict[str, list[dict]]:
    """Ask every child `command` `rounds` times, rotating who goes first, so load spikes spread evenly."""
    sides = list(children)
    answers = {side: [] for side in sides}
    for r in range(rounds):
        for side in sides[r % len(sides):] + sides[: r % len(sides)]:
            answers[side].append(children[side].ask(command))
    return answers


def compare_steps(argvs: dict[str, list[str]], rounds: int, profile: bool = False) -> dict[str, dict]:
    """Start one child per side, time `rounds` steps round-robin, read each side's peak memory.
    Returns side -> {"steps": [{"s", "loss"}, ...], "memory": PeakMemory.read()}."""
    with children_of(argvs) as children:
        steps = round_robin(children, "step", rounds)
        memory = {side: child.ask("memory") for side, child in children.items()}
        profiles = {side: child.ask("profile") if profile else None for side, child in children.items()}
    return {side: {"steps": steps[side], "memory": memory[side], "profile": profiles[side]} for side in argvs}


def summarize(result: dict, tokens: int, warmup: int) -> dict:
    """A side's figures from `compare_steps`: tokens/s of the median and best timed step, peak memory."""
    timed_s = [r["s"] for r in result["steps"][warmup:]] or [r["s"] for r in result["steps"]]
    memory = result["memory"]
    return {"tokens_per_s": tokens / statistics.median(timed_s), "best_tokens_per_s": tokens / min(timed_s),
            "step_s": [round(r["s"], 4) for r in result["steps"]], "first_loss": result["steps"][0]["loss"],
            "losses": [r["loss"] for r in result["steps"]], "grad_norms": [r.get("grad_norm") for r in result["steps"]],
            "moved": [r.get("moved") for r in result["steps"]],
            "peak_mib": memory["peak_mib"] - memory["baseline_mib"], "abs_peak_mib": memory["peak_mib"],
            "peak_reset": memory["peak_reset"], "memory_method": memory["method"], "profile": result.get("profile")}


# ---- the parent: machine, conditions, output


def machine() -> dict:
    """CPU model, cores this process may use, RAM, GPU, Python and library versions."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    ram_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:"))
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "ram_gib": round(ram_kib / 2**20, 1), "gpu": gpu,
            "python": platform.python_version(), "versions": versions, "bf16": bf16_support()}


def machine_bf16(info: dict) -> str:
    """`bf16_text` of a machine() record ("bf16 units: unknown" for records written before it was measured)."""
    return bf16_text(info["bf16"]) if "bf16" in info else "bf16 units: unknown"


def versions_text(info: dict) -> str:
    return ", ".join(f"{name} {version}" for name, version in info["versions"].items())


def cpu_pressure() -> str:
    """The kernel's share of time some task waited for a CPU (PSI), a sign of other load on the machine."""
    path = Path("/proc/pressure/cpu")
    return path.read_text().splitlines()[0] if path.exists() else "n/a"


class RunClock:
    """The command, wall time and the machine's load around one bench run."""

    def __init__(self, script: str) -> None:
        self.command = "python " + " ".join([f"scripts/{Path(script).name}", *sys.argv[1:]])
        self.started, self.load_start = time.perf_counter(), os.getloadavg()[0]

    def finish(self) -> dict:
        return {"command": self.command, "wall_s": time.perf_counter() - self.started, "load_start": self.load_start,
                "load_end": os.getloadavg()[0], "pressure_end": cpu_pressure(), "machine": machine(),
                "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def trained(side: dict) -> bool:
    """A side of `summarize` trained: every step had a nonzero finite gradient norm and moved its weights,
    and (over two or more steps) the loss changed."""
    norms, moved, losses = side["grad_norms"], side["moved"], side["losses"]
    ok_norms = all(n is not None and 0 < n < float("inf") for n in norms)
    return ok_norms and all(m is not False for m in moved) and (len(losses) < 2 or losses[-1] != losses[0])


def trained_note(sides: dict[str, dict]) -> str:
    """The markdown line saying each side trained: its gradient norms, losses and whether weights moved."""
    parts = []
    for name, side in sides.items():
        norms = ", ".join(f"{n:.3g}" for n in side["grad_norms"] if n is not None) or "not measured"
        losses = " -> ".join(f"{x:.4f}" for x in (side["losses"][0], side["losses"][-1]))
        moved = "not probed" if None in side["moved"] else ("yes" if all(side["moved"]) else "NO")
        parts.append(f"{name}: grad norms {norms}; loss {losses}; weights moved every step: {moved}"
                     + ("" if trained(side) else " (DID NOT TRAIN)"))
    return "- Trained: " + "; ".join(parts) + "."


def run_notes(settings: dict) -> list[str]:
    """The closing lines of every bench's markdown block: the load on the machine and the command."""
    return [f"- Load from other processes: load average {settings['load_start']:.1f} at start, "
            f"{settings['load_end']:.1f} at end; CPU pressure at end: `{settings['pressure_end']}`.",
            f"- Command: `{settings['command']}` ({settings['wall_s']:.0f} s in all), {settings['date']}."]


def memory_note(memories: list[dict]) -> str:
    reset = all(m["peak_reset"] for m in memories)
    method = memories[0]["method"] if memories else "n/a"
    return (f"- Memory: {method}, each side in its own process, reset after the model is built "
            f"({'reset worked' if reset else 'reset FAILED: peaks include the build'}), read after the timed steps; "
            "'over model' subtracts what the process held once built (weights, reference, libraries).")


def emit(markdown: str, payload: dict) -> None:
    """Print the markdown block, then the JSON line bench_all.py collects."""
    print(markdown)
    print(JSON_PREFIX + json.dumps(payload), flush=True)
