"""Benchmark batched generation (issue 18 item 3): ours vs transformers' `model.generate` on the same weights.

1. Batch 32 sampling (the rollout engine of online RL): 32 prompts of mixed length (16-48 tokens, left-padded),
   64 new tokens forced (no EOS stop), temperature 1.0, top_p 0.9, no top_k: new tokens/s. Sides: ours eager,
   ours with the compiled decode step (generate(compile=True)), transformers with its dynamic cache and with its
   static cache (cache_implementation="static"); the ratio takes transformers' best.
2. Greedy batch 1 (prompt 32, 64 new tokens): new tokens/s against the bandwidth floor bench_model.py computes
   (one pass of 1-token GEMVs over every linear weight) and against transformers; both emit the same tokens.

The weights are written once by transformers (save_pretrained) and loaded by both sides (Mistral.from_pretrained).
Each side runs in its own child process; timed calls go round-robin (see _bench_common). Every call is checked to
have generated exactly the requested tokens. Prints a markdown block and a JSON line for bench_all.py.

    python scripts/bench_generate.py [--repeats 2] [--no-compile] [--no-hf-static] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared bench helpers beside this file
import _bench_common as mem  # noqa: E402
from bench_model import gemv_floor_s  # noqa: E402

from mistral_train import Mistral, MistralConfig  # noqa: E402
from mistral_train.generate import generate  # noqa: E402

BATCH, MIN_PROMPT, MAX_PROMPT, NEW_TOKENS, TEMPERATURE, TOP_P = 32, 16, 48, 64, 1.0, 0.9
GREEDY_PROMPT, GREEDY_NEW = 32, 64
PAD = 0
SIDES = ("ours", "ours-compiled", "hf", "hf-static")
GREEDY_SIDES = ("ours", "ours-compiled", "hf")  # a static cache only helps transformers when compiled


def cpu_flags() -> str:
    """The CPU's vector/matrix extensions (AVX2, AVX-512 and its bf16, AMX) as _bench_common reads them, and torch's pick."""
    if hasattr(mem, "bf16_support"):  # the shared reader of /proc/cpuinfo (issue 18 item 1)
        flags = mem.bf16_support()["simd"]
    else:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    wanted = [f for f in flags if f.startswith(("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx"))]
    return f"{' '.join(wanted) or 'no AVX2/AVX-512/AMX'}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}"


def prompts(vocab: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` left-padded prompts of seeded lengths in [MIN_PROMPT, MAX_PROMPT]: (ids, attention_mask)."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(MIN_PROMPT, MAX_PROMPT + 1, (batch,), generator=gen)
    width = int(lengths.max())
    mask = (torch.arange(width)[None] >= (width - lengths)[:, None]).long()
    ids = torch.randint(3, vocab, (batch, width), generator=gen).masked_fill(mask == 0, PAD)
    return ids, mask


def serve_side(side: str, folder: Path, args: argparse.Namespace) -> None:
    """Child process of one side: load the shared weights, answer "sample", "greedy" (and their warm-ups)."""
    torch.set_num_threads(mem.THREADS)
    ours = side.startswith("ours")
    if ours:
        model = Mistral.from_pretrained(folder).eval()
    else:
        model = transformers.MistralForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
        model.generation_config.eos_token_id = None  # never stop early, never suppress EOS
    vocab = model.config.vocab_size
    ids, mask = prompts(vocab, args.batch)
    greedy_prompt = torch.randint(3, vocab, (1, GREEDY_PROMPT), generator=torch.Generator().manual_seed(1))

    def run(prompt: torch.Tensor, attention: torch.Tensor, new: int, sample: bool, seed: int) -> torch.Tensor:
        if ours:
            return generate(model, prompt, new, temperature=TEMPERATURE if sample else 0.0, top_p=TOP_P if sample else None,
                            attention_mask=attention, stop_at_eos=False, compile=side == "ours-compiled",
                            generator=torch.Generator().manual_seed(seed))
        torch.manual_seed(seed)
        with torch.no_grad():
            kw = dict(do_sample=True, temperature=TEMPERATURE, top_p=TOP_P, top_k=0) if sample else \
                dict(do_sample=False, temperature=None, top_p=None, top_k=None)
            return model.generate(prompt, attention_mask=attention, max_new_tokens=new, min_new_tokens=new,
                                  eos_token_id=None, pad_token_id=PAD, **kw,
                                  **({"cache_implementation": "static"} if side == "hf-static" else {}))

    def timed_call(sample: bool, new: int) -> dict:
        prompt, attention = (ids, mask) if sample else (greedy_prompt, torch.ones_like(greedy_prompt))
        seconds, out = mem.timed(lambda: run(prompt, attention, new, sample, seed=2), "cpu")
        generated = out.shape[1] - prompt.shape[1]
        if out.shape[0] != prompt.shape[0] or generated != new:
            raise RuntimeError(f"{side}: generated {tuple(out.shape)} for prompts {tuple(prompt.shape)}, expected {new} new")
        return {"s": seconds, "rows": out.shape[0], "tokens": out[0, prompt.shape[1]:].tolist()}

    # The compiled step's graph is specialised to the cache size (prompt + new tokens): its warm-up call must have the
    # timed calls' shapes, or the first timed call pays a recompile. Eager sides warm up on a short call.
    full = side == "ours-compiled"
    mem.serve({"sample": lambda: timed_call(True, args.new_tokens),
               "sample_warmup": lambda: timed_call(True, args.new_tokens if full else 4),
               "greedy": lambda: timed_call(False, args.greedy_new),
               "greedy_warmup": lambda: timed_call(False, args.greedy_new if full else 4)})


def figures(runs: dict[str, list[dict]], new: int) -> dict[str, dict]:
    """Per side: new tokens/s of the median and best call (rows x new tokens per call)."""
    out = {}
    for side, calls in runs.items():
        tokens = calls[0]["rows"] * new
        out[side] = {"tokens_per_s": tokens / statistics.median(c["s"] for c in calls),
                     "best_tokens_per_s": tokens / min(c["s"] for c in calls), "s": [round(c["s"], 2) for c in calls]}
    return out


def verdict(ratio: float, target: float) -> str:
    return "met" if ratio >= target else "**missed**"


def report(sample: dict, greedy: dict, same: bool, floor_s: float, args: argparse.Namespace, settings: dict) -> str:
    info = settings["machine"]
    hf_best = max((s for s in sample if s.startswith("hf")), key=lambda s: sample[s]["tokens_per_s"])
    ours_best = max((s for s in sample if s.startswith("ours")), key=lambda s: sample[s]["tokens_per_s"])
    ratio = sample[ours_best]["tokens_per_s"] / sample[hf_best]["tokens_per_s"]
    floor_tps = 1 / floor_s
    greedy_best = max((s for s in greedy if s.startswith("ours")), key=lambda s: greedy[s]["tokens_per_s"])
    of_floor = greedy[greedy_best]["tokens_per_s"] / floor_tps
    rows = ["| Measure | " + " | ".join(sample) + " |", "|---|" + "---:|" * len(sample),
            f"| Batch {args.batch} sampling, new tokens/s, median call | "
            + " | ".join(f"{sample[s]['tokens_per_s']:.1f}" for s in sample) + " |",
            f"| Batch 1 greedy, new tokens/s, median call | "
            + " | ".join(f"{greedy[s]['tokens_per_s']:.1f}" if s in greedy else "not run" for s in sample) + " |",
            "", "| Target | target | measured | verdict |", "|---|---:|---:|---|",
            f"| Batch {args.batch} sampling: {ours_best} / transformers' best ({hf_best}) | >= 3x | {ratio:.2f}x | "
            f"{verdict(ratio, 3.0)} |",
            f"| Greedy batch 1: {greedy_best} / bandwidth floor ({floor_tps:.0f} tokens/s) | >= 0.9 | {of_floor:.2f} | "
            f"{verdict(of_floor, 0.9)} |"]
    lines = [
        f"- Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB; CPU flags: {cpu_flags()}; "
        f"torch.set_num_threads({mem.THREADS}) in every process; Python {info['python']}, {mem.versions_text(info)}; fp32.",
        f"- Model: bench_model's ARCH (hidden {args.arch['hidden_size']}, {args.arch['num_hidden_layers']} layers, vocab "
        f"{args.arch['vocab_size']}), initialised and saved by transformers, loaded by both sides.",
        f"- Sampling: {args.batch} prompts of {MIN_PROMPT}-{MAX_PROMPT} tokens left-padded, {args.new_tokens} new tokens "
        f"forced, temperature {TEMPERATURE}, top_p {TOP_P}, no top_k; one warm-up call (the compile, for ours-compiled) "
        f"then {args.repeats} timed calls per side, round-robin. Seconds: "
        + "; ".join(f"{s} {', '.join(map(str, f['s']))}" for s, f in sample.items()) + ".",
        f"- Greedy: batch 1, prompt {GREEDY_PROMPT}, {args.greedy_new} new tokens forced (prefill included). Seconds: "
        + "; ".join(f"{s} {', '.join(map(str, f['s']))}" for s, f in greedy.items())
        + f". Identical greedy tokens ours vs transformers: {'yes' if same else 'NO'}.",
        f"- Decode floor (bench_model.gemv_floor_s, 1 thread): {floor_s * 1e3:.1f} ms per token, {floor_tps:.0f} tokens/s.",
        "- Every call checked to return its rows with exactly the requested new tokens on every side.",
    ]
    return "\n".join(lines + mem.run_notes(settings) + ["", *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per side and measure")
    parser.add_argument("--no-compile", action="store_true", help="skip ours with the compiled decode step")
    parser.add_argument("--no-hf-static", action="store_true", help="skip transformers with its static cache")
    parser.add_argument("--device", default="cpu", choices=("cpu",), help="CPU only (bench_all passes it)")
    parser.add_argument("--quick", action="store_true", help="tiny model, batch 4, 8 tokens: a smoke test")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.arch = mem.QUICK_ARCH if args.quick else mem.ARCH
    args.batch, args.new_tokens, args.greedy_new = (4, 8, 8) if args.quick else (BATCH, NEW_TOKENS, GREEDY_NEW)
    if args.quick:
        args.repeats = 1
    if args.child:
        serve_side(args.child, args.folder, args)
        return

    torch.set_num_threads(mem.THREADS)
    sides = [s for s in SIDES if not (args.no_compile and s == "ours-compiled") and not (args.no_hf_static and s == "hf-static")]
    clock = mem.RunClock(__file__)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        torch.manual_seed(0)
        hf_config = transformers.MistralConfig(**MistralConfig(**args.arch).to_hf_dict())
        transformers.MistralForCausalLM(hf_config).save_pretrained(folder)  # the one copy of the weights
        argvs = {s: [__file__, *sys.argv[1:], "--child", s, "--folder", str(folder)] for s in sides}
        with mem.children_of(argvs) as children:
            print("[bench] batched sampling", file=sys.stderr, flush=True)
            mem.round_robin(children, "sample_warmup", 1)
            sample = mem.round_robin(children, "sample", args.repeats)
            decoders = {s: c for s, c in children.items() if s in GREEDY_SIDES}
            print("[bench] greedy batch 1", file=sys.stderr, flush=True)
            mem.round_robin(decoders, "greedy_warmup", 1)
            greedy = mem.round_robin(decoders, "greedy", args.repeats)
        floor_s = gemv_floor_s(folder / "model.safetensors")
    same = all(runs[-1]["tokens"] == greedy["ours"][-1]["tokens"] for runs in greedy.values())
    settings = clock.finish()
    sample_f, greedy_f = figures(sample, args.new_tokens), figures(greedy, args.greedy_new)
    payload = {"bench": "generate", "device": "cpu", "batch": args.batch, "new_tokens": args.new_tokens,
               "greedy_new_tokens": args.greedy_new, "sample": sample_f, "greedy": greedy_f, "same_greedy_tokens": same,
               "floor_tokens_per_s": 1 / floor_s, "cpu_flags": cpu_flags(), "run": settings}
    mem.emit(report(sample_f, greedy_f, same, floor_s, args, settings), payload)


if __name__ == "__main__":
    main()
