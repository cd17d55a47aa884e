"""Benchmark our Mistral against transformers' MistralForCausalLM: full training step and greedy decode.

1. Training step (forward, backward, clip 1.0 and AdamW, loss on labels = input ids): tokens/s and
   peak memory (the optimizer's states included), in the precision --precision names:
   fp32; bf16-autocast (fp32 weights, torch.autocast(bf16) around forward and backward on both sides);
   bf16 (the weights bf16 on both sides). The optimizer is what each trainer builds: ours
   `build_optimizer` (fused AdamW over fp32 weights; over bf16 weights trainer.bf16_update's default,
   torch-optimi's Kahan-summed AdamW), theirs transformers Trainer's default `adamw_torch_fused`
   (over bf16 weights a plain bf16 update: transformers offers no compensated one).
2. Greedy decoding with a KV cache: new tokens/s, and whether both sides emit the same tokens.

Sides: ours, transformers with SDPA attention, transformers with eager attention (training
only). Decoding is also timed on 1 thread, as a diagnostic: on a shared 2-core machine the
threads of a parallel region wait on each other and tiny decode ops pay for it. Each side
lives in its own child process (so memory high-water marks do not mix) and the timed calls
go round-robin over the children (so load from other processes hits every side alike).
All sides get the same weights (one state dict, saved once as safetensors) and the same
inputs. Prints a markdown block ready for docs/benchmarks.md and a JSON line for bench_all.py.
On CUDA (--device cuda) the default precision is bf16 and memory is torch.cuda.max_memory_allocated.

    python scripts/bench_model.py [--seq 512] [--batch 4] [--warmup 1] [--steps 5] [--decode-repeats 5]
                                  [--no-eager] [--no-decode] [--checkpointing]
                                  [--precision fp32|bf16-autocast|bf16] [--device cpu|cuda|auto] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared bench helper beside this file
import _bench_common as mem  # noqa: E402
import _bench_models as models  # noqa: E402

from mistral_train import Mistral, MistralConfig  # noqa: E402
from mistral_train.generate import generate  # noqa: E402

THREADS = mem.THREADS
PROMPT, NEW_TOKENS, DECODE_REPEATS = 32, 128, 5
SIDES = {"ours": "ours", "hf-sdpa": "sdpa", "hf-eager": "eager"}
# Activation checkpointing on both sides (--checkpointing): every block recomputed in the backward,
# ours with policy "block", transformers with gradient_checkpointing_enable (non-reentrant).
CKPT_SIDES = {"ours+ckpt": "ours", "hf-sdpa+ckpt": "hf-sdpa"}


def build(side: str, weights: Path, arch: dict) -> torch.nn.Module:
    """One side's model with the shared weights; `side` is a key of SIDES or CKPT_SIDES."""
    cfg, base = MistralConfig(**arch), CKPT_SIDES.get(side, side)
    if base == "ours":
        model = Mistral(cfg)
    else:
        hf_cfg = transformers.MistralConfig(**cfg.to_hf_dict())
        hf_cfg._attn_implementation = SIDES[base]
        model = transformers.MistralForCausalLM(hf_cfg)
    model.load_state_dict(load_file(weights), strict=True)
    if side in CKPT_SIDES:
        if base == "ours":
            model.set_gradient_checkpointing("block")
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def serve_side(side: str, weights: Path, args: argparse.Namespace) -> None:
    """Child process of one side: build the model, then answer "step", "memory" and the decode commands."""
    torch.set_num_threads(THREADS)
    device = args.device
    model = build(side, weights, args.arch).to(device, mem.weight_dtype(args.precision))
    autocast = mem.autocast(args.precision, device)
    vocab = args.arch["vocab_size"]
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    prompt = torch.randint(0, vocab, (1, PROMPT), generator=torch.Generator().manual_seed(1)).to(device)

    # A training step is forward, backward, clip and the optimizer each trainer builds (module docstring).
    # lr is tiny so the greedy tokens after the steps still compare; over bf16 weights 1e-8 is below half
    # an ulp of every weight and a plain update would not move them, so there lr is the LoRA benches'.
    lr = models.LR if args.precision == "bf16" else 1e-8
    optimizer = models.our_optimizer(model, device, lr) if side.startswith("ours") else models.their_optimizer(model, lr)
    params = list(model.parameters())

    def step() -> tuple[float, float]:
        model.train()
        with autocast():
            if side.startswith("ours"):
                loss = model(ids, labels=ids)
            else:
                # Training needs no KV cache; turning it off only removes work from their side.
                loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()  # outside autocast, as torch's AMP recipe and our backward_window do
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item(), float(norm)

    def decode(new_tokens: int = args.new_tokens, threads: int = THREADS) -> dict:
        model.eval()
        torch.set_num_threads(threads)
        if side == "ours":
            seconds, out = mem.timed(lambda: generate(model, prompt, max_new_tokens=new_tokens, stop_at_eos=False), device)
        else:
            with torch.no_grad():
                seconds, out = mem.timed(lambda: hf_greedy(model, prompt, new_tokens), device)
        torch.set_num_threads(THREADS)
        if out.shape[1] - PROMPT != new_tokens:
            raise RuntimeError(f"{side}: generated {out.shape[1] - PROMPT} new tokens, expected {new_tokens}")
        return {"s": seconds, "tokens": out[0, PROMPT:].tolist()}

    mem.serve_steps(step, device, {"decode": decode, "decode_warmup": lambda: decode(8),
                                   "decode_1thread": lambda: decode(threads=1)}, params=params)


def optimizer_names(precision: str) -> tuple[str, str]:
    """(ours, theirs): the AdamW each side's trainer builds over weights of `precision`."""
    if precision == "bf16":
        return "torch-optimi AdamW with Kahan summation (trainer.bf16_update auto)", "torch fused AdamW, plain bf16 update"
    return "torch fused AdamW (build_optimizer)", "torch fused AdamW (Trainer's adamw_torch_fused)"


def hf_greedy(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """transformers' greedy generate forced to exactly `new_tokens` new tokens (no EOS stop)."""
    model.generation_config.eos_token_id = None  # never stop early, and never suppress EOS either
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                          pad_token_id=0, top_k=None, top_p=None, temperature=None)


def gemv_floor_s(weights: Path, repeats: int = 10) -> float:
    """Fastest time (1 thread) to multiply one token's vector by every linear weight once:
    the memory-bandwidth floor of a batch-1 fp32 decode step on this machine, any implementation."""
    matrices = [w for name, w in load_file(weights).items() if w.dim() == 2 and "embed_tokens" not in name]
    vectors = {w.shape[1]: torch.randn(1, w.shape[1]) for w in matrices}
    torch.set_num_threads(1)
    times = []
    for _ in range(repeats + 1):
        times.append(mem.timed(lambda: [vectors[w.shape[1]] @ w.T for w in matrices], "cpu")[0])
    torch.set_num_threads(THREADS)
    return min(times[1:])


def report(train: dict, decode: dict, decode_1thread: dict, args: argparse.Namespace, settings: dict) -> str:
    """The markdown block: machine, settings, notes and the table."""
    sides, arch, warmup = list(train), args.arch, args.warmup
    others = [s for s in sides if s != "ours" and s not in CKPT_SIDES]
    names = {"hf-sdpa": "transformers sdpa", "hf-eager": "transformers eager"}
    head = "| Measure | ours | " + " | ".join(f"{names[s]} | ours / {SIDES[s]}" for s in others) + " |"
    rows = [head, "|---|---:|" + "---:|---:|" * len(others)]

    def add(name: str, values: dict, fmt: str) -> None:
        cells = [name, fmt.format(values["ours"])]
        for s in others:
            cells += [fmt.format(values[s]), f"{values['ours'] / values[s]:.2f}x"] if s in values else ["not run", ""]
        rows.append("| " + " | ".join(cells) + " |")

    add("Train step, tokens/s, median step (higher is better)", {s: train[s]["tokens_per_s"] for s in sides}, "{:.0f}")
    add("Train step, tokens/s, best step", {s: train[s]["best_tokens_per_s"] for s in sides}, "{:.0f}")
    add("Train step, peak memory over the built model, MiB (lower is better)", {s: train[s]["peak_mib"] for s in sides}, "{:.0f}")
    add("Train step, absolute peak memory, MiB", {s: train[s]["abs_peak_mib"] for s in sides}, "{:.0f}")
    if all(s in train for s in CKPT_SIDES):
        ours, theirs = (train[s] for s in CKPT_SIDES)
        ckpt_rows = ["", "With activation checkpointing on both sides (ours: policy block; transformers: "
                     "gradient_checkpointing_enable, non-reentrant):", "",
                     "| Measure | ours | transformers sdpa | ours / sdpa |", "|---|---:|---:|---:|"]
        for what, key, fmt in (("Train step, tokens/s, median step", "tokens_per_s", "{:.0f}"),
                               ("Train step, peak memory over the built model, MiB", "peak_mib", "{:.0f}"),
                               ("Train step, absolute peak memory, MiB", "abs_peak_mib", "{:.0f}")):
            ckpt_rows.append(f"| {what} | {fmt.format(ours[key])} | {fmt.format(theirs[key])} | {ours[key] / theirs[key]:.2f}x |")
    else:
        ckpt_rows = []
    if decode:
        add(f"Greedy decode, {THREADS} threads, new tokens/s, median call (higher is better)",
            {s: args.new_tokens / statistics.median(r["s"] for r in decode[s]) for s in decode}, "{:.1f}")
        add(f"Greedy decode, {THREADS} threads, new tokens/s, best call",
            {s: args.new_tokens / min(r["s"] for r in decode[s]) for s in decode}, "{:.1f}")
        add("Greedy decode, 1 thread (diagnostic), new tokens/s, median call",
            {s: args.new_tokens / statistics.median(r["s"] for r in decode_1thread[s]) for s in decode_1thread}, "{:.1f}")
    info, tokens = settings["machine"], args.batch * args.seq
    lines = [
        f"- Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB, torch.set_num_threads({THREADS}) in "
        f"every process; {args.device}{' (' + info['gpu'] + ')' if args.device == 'cuda' else ''}; Python "
        f"{info['python']}, {mem.versions_text(info)}; {mem.machine_bf16(info)}; precision {args.precision}: "
        f"{mem.precision_text(args.precision)}.",
        f"- Model: hidden {arch['hidden_size']}, {arch['num_hidden_layers']} layers, {arch['num_attention_heads']} heads, "
        f"{arch['num_key_value_heads']} KV heads, intermediate {arch['intermediate_size']}, vocab {arch['vocab_size']}, "
        f"sliding_window None, untied head: {settings['n_params'] / 1e6:.1f} M parameters, the same weights on every side.",
        f"- Training: batch {args.batch} x seq {args.seq} = {tokens} tokens per step, labels = input ids, forward + "
        f"backward + clip 1.0 + AdamW step (its states in the memory; ours: {optimizer_names(args.precision)[0]}, "
        f"transformers: {optimizer_names(args.precision)[1]}); {warmup} warm-up + {args.steps} timed steps per side, taken round-robin; "
        "median and best. Step seconds (warm-up first): "
        + "; ".join(f"{s} " + ", ".join(f"{t:.2f}" for t in train[s]["step_s"]) for s in sides) + ".",
        "- First-step losses: " + ", ".join(f"{s} {train[s]['first_loss']:.6f}" for s in sides) + ".",
        mem.trained_note(train),
        mem.memory_note([settings["memory"][s] for s in sides]),
        mem.profile_note({s: train[s]["profile"] for s in sides}),
    ]
    if decode:
        ours_tokens = decode["ours"][-1]["tokens"]
        both = {**decode, **{f"{k} on 1 thread": v for k, v in decode_1thread.items()}}
        same = ", ".join(f"ours vs {s}: {'yes' if runs[-1]['tokens'] == ours_tokens else 'NO'}"
                         for s, runs in both.items() if s != "ours")
        seconds = "; ".join(f"{s} " + ", ".join(f"{r['s']:.2f}" for r in decode[s]) for s in decode)
        seconds_1 = "; ".join(f"{s} " + ", ".join(f"{r['s']:.2f}" for r in decode_1thread[s]) for s in decode_1thread)
        lines += [
            f"- Decode: batch 1, prompt {PROMPT} tokens, {args.new_tokens} new tokens forced (no EOS stop), "
            f"{len(decode['ours'])} timed calls per side round-robin after a warm-up call; includes the prefill. "
            f"Decode seconds ({THREADS} threads): {seconds}; 1 thread: {seconds_1}.",
            f"- Identical greedy tokens: {same}.",
        ]
    if settings.get("gemv_floor_s"):
        floor = settings["gemv_floor_s"]
        lines.append(f"- Decode floor: one pass of 1-token GEMVs over every linear weight (the bytes any fp32 batch-1 "
                     f"decoder must read per token) takes {floor * 1e3:.1f} ms on 1 thread, i.e. at most "
                     f"{1 / floor:.0f} new tokens/s.")
    return "\n".join(lines + mem.run_notes(settings) + ["", *rows, *ckpt_rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, help="tokens per row (default 512; 128 with --quick)")
    parser.add_argument("--batch", type=int, help="rows per step (default 4; 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--decode-repeats", type=int, default=DECODE_REPEATS)
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--no-eager", action="store_true", help="skip transformers' eager attention")
    parser.add_argument("--no-decode", action="store_true", help="training steps only")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--precision", choices=mem.PRECISIONS, help="default fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 step, short decode: a smoke test")
    parser.add_argument("--checkpointing", action="store_true",
                        help="also ours and transformers sdpa with activation checkpointing on both sides")
    parser.add_argument("--child", choices=[*SIDES, *CKPT_SIDES], help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.device, args.arch = mem.pick_device(args.device), mem.QUICK_ARCH if args.quick else mem.ARCH
    args.precision = args.precision or mem.default_precision(args.device)
    if args.quick:
        args.warmup, args.steps, args.decode_repeats, args.new_tokens = 0, 1, 1, 8
    args.seq, args.batch = args.seq or (128 if args.quick else 512), args.batch or (2 if args.quick else 4)
    if args.child:
        serve_side(args.child, args.weights, args)
        return

    torch.set_num_threads(THREADS)
    sides = [s for s in SIDES if not (args.no_eager and s == "hf-eager")] + (list(CKPT_SIDES) if args.checkpointing else [])
    clock = mem.RunClock(__file__)
    decode, decode_1thread, floor = {}, {}, None
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.safetensors"
        torch.manual_seed(0)
        state = Mistral(MistralConfig(**args.arch)).state_dict()
        n_params = sum(v.numel() for v in state.values())
        save_file(state, str(weights))
        del state
        print(f"[bench] building {sides}", file=sys.stderr, flush=True)
        argvs = {s: [__file__, *sys.argv[1:], "--child", s, "--weights", str(weights)] for s in sides}
        with mem.children_of(argvs) as children:
            print("[bench] training steps", file=sys.stderr, flush=True)
            steps = mem.round_robin(children, "step", args.warmup + args.steps)
            memory = {s: child.ask("memory") for s, child in children.items()}
            profiles = {s: child.ask("profile") for s, child in children.items()}
            if not args.no_decode:
                # Eager attention only changes the prompt's prefill here; its decode is slow and adds nothing.
                decoders = {s: c for s, c in children.items() if s in ("ours", "hf-sdpa")}
                print("[bench] greedy decode", file=sys.stderr, flush=True)
                mem.round_robin(decoders, "decode_warmup", 1)
                decode = mem.round_robin(decoders, "decode", args.decode_repeats)
                decode_1thread = mem.round_robin(decoders, "decode_1thread", args.decode_repeats)
        if not args.no_decode and args.device == "cpu":
            floor = gemv_floor_s(weights)
    train = {s: mem.summarize({"steps": steps[s], "memory": memory[s], "profile": profiles[s]}, args.batch * args.seq, args.warmup)
             for s in sides}
    settings = {**clock.finish(), "n_params": n_params, "memory": memory, "gemv_floor_s": floor}
    decode_figures = {s: {"tokens_per_s": args.new_tokens / statistics.median(r["s"] for r in runs),
                          "same_tokens": runs[-1]["tokens"] == decode["ours"][-1]["tokens"]} for s, runs in decode.items()}
    payload = {"bench": "model", "device": args.device, "precision": args.precision, "seq": args.seq, "batch": args.batch, "arch": args.arch,
               "n_params": n_params, "train": train,
               "decode": decode_figures, "new_tokens": args.new_tokens, "run": settings}
    mem.emit(report(train, decode, decode_1thread, args, settings), payload)


if __name__ == "__main__":
    main()
