"""Benchmark SFT training throughput on CPU, fp32: ours packed, ours padded, trl.SFTTrainer.

Every side trains one epoch over the same tokenized chat examples (assistant-only labels, our
`tokenize_rows` with the real v1 tokenizer) from the same initial weights, with AdamW, clipping
at 1.0 and a cosine schedule, no gradient checkpointing, no PEFT:
- ours packed: best-fit packing into rows of MAX_LEN (`pack_examples`), rows in `epoch_order`,
  PACKED_ROWS rows per step (`collate_packed`), the loop's step (`backward_window`, clip, AdamW, schedule);
- ours padded: PADDED_BATCH examples per step, right-padded to the longest (`collate_padded`);
- trl padded: `trl.SFTTrainer` on the same ids + `assistant_masks`, same order (sequential sampler),
  PADDED_BATCH per step, so its batches and padding are exactly ours padded;
- trl packed (bfd): `packing=True`, trl's padding-free best-fit packing into MAX_LEN, PACKED_ROWS per step.

Data: synthetic conversations of 1 to 20 turns stitched from the bundled tiny_chat rows
(20 to ~450 tokens, log-uniform in turns), so packing has something to do. Reported per side:
real (non-pad) tokens/s, processed token slots/s (pads included), padding share, peak RSS.
Each side runs in its own child process (clean peak-RSS figures; scripts/_bench_common.py);
children are warmed up with one optimizer step, then run their timed epoch one after the other.
--precision: fp32 (the CPU default); bf16-autocast (fp32 weights under bf16 autocast, trl: bf16=True; the
CUDA default); bf16 (the weights bf16 on every side: ours stepped with trainer.bf16_update's default Kahan
AdamW, trl with its plain AdamW over them, bf16=True). On CUDA memory is torch.cuda.max_memory_allocated.
Prints a markdown block and a JSON line for bench_all.py.

    python scripts/bench_sft.py [--examples 96] [--repeats 1] [--no-trl-packed] [--precision fp32|bf16-autocast|bf16]
                                [--device cpu|cuda|auto] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared bench helper beside this file
import _bench_common as mem  # noqa: E402

from mistral_train import Mistral, MistralConfig  # noqa: E402
from mistral_train.data.spec import DataSpec  # noqa: E402
from mistral_train.data.packing import pack_examples  # noqa: E402
from mistral_train.data.sft import SFTExample, tokenize_rows  # noqa: E402
from mistral_train.data.sources import load_rows  # noqa: E402
from mistral_train.tokenizer.tokenizer import bundled_tokenizer_path, load_tokenizer  # noqa: E402
from _bench_sft_sides import (  # noqa: E402
    ARCH, CLIP, LR, MAX_LEN, MAX_TURNS, PACKED_ROWS, PADDED_BATCH, QUICK_EXAMPLES, SEED, SIDES, THREADS, WEIGHT_DECAY,
    our_side, trl_side)


def synthetic_rows(n: int, seed: int) -> list[dict]:
    """`n` conversations of 1..MAX_TURNS user/assistant pairs from the bundled rows (turns log-uniform)."""
    bundled = list(load_rows(DataSpec(format="messages")))
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        turns = max(1, min(MAX_TURNS, round(math.exp(rng.uniform(0.0, math.log(MAX_TURNS))))))
        start = rng.randrange(len(bundled) - turns)
        messages = [m for row in bundled[start : start + turns] for m in row["messages"]]
        if i % 3 == 0:
            messages = [{"role": "system", "content": "Answer with one number word."}, *messages]
        rows.append({"messages": messages, "source": "synthetic chat", "row": i})
    return rows

def serve_side(side: str, out: Path, device: str, precision: str) -> None:
    torch.set_num_threads(THREADS)
    data = json.loads((out / "examples.json").read_text())
    examples = [SFTExample(e["input_ids"], e["labels"], "synthetic chat", i, False) for i, e in enumerate(data["examples"])]
    build = our_side if side.startswith("ours") else trl_side
    handlers = build(side.endswith("packed"), examples, data["pad_id"], out / "weights.safetensors", out, device, precision)
    memory = mem.PeakMemory(device)
    memory.start()  # the weights' transient load copy must not count
    mem.serve({**handlers, "memory": memory.read})


# ---- parent


def prepare(out: Path, n_examples: int) -> dict:
    """Tokenize the data, save examples, weights and an HF tokenizer folder under `out`; return a summary."""
    tokenizer = load_tokenizer(bundled_tokenizer_path("v1"))
    examples, stats = tokenize_rows(synthetic_rows(n_examples, SEED), tokenizer, MAX_LEN, train_on="assistant")
    random.Random(SEED).shuffle(examples)  # the padded sides' order (a random sampler's, fixed once)
    pad_id = tokenizer.eos_id  # as trl does when the tokenizer has no pad token
    (out / "examples.json").write_text(json.dumps(
        {"pad_id": pad_id, "examples": [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]}))
    torch.manual_seed(SEED)
    state = Mistral(MistralConfig(**ARCH)).state_dict()
    save_file(state, str(out / "weights.safetensors"))
    (out / "tokenizer").mkdir()
    shutil.copy(bundled_tokenizer_path("v1"), out / "tokenizer" / "tokenizer.model")
    lengths = sorted(len(e.input_ids) for e in examples)
    rows = pack_examples(examples, MAX_LEN)
    total = stats.total()
    return {"examples": len(examples), "tokens": sum(lengths), "labels": total.label_tokens, "min": lengths[0],
            "median": lengths[len(lengths) // 2], "max": lengths[-1], "truncated": total.truncated,
            "dropped": total.dropped, "packed_rows": len(rows), "n_params": sum(v.numel() for v in state.values())}


def figures(epochs: dict, memory: dict) -> dict:
    """Per side: epoch seconds (median), real tokens/s, real tokens per CPU-second and peak memory."""
    out = {}
    for side, runs in epochs.items():
        wall, cpu = statistics.median(r["s"] for r in runs), statistics.median(r["cpu_s"] for r in runs)
        last = runs[-1]  # token counts are the same every epoch
        out[side] = {"epoch_s": wall, "tokens_per_s": last["real"] / wall, "real_per_cpu_s": last["real"] / cpu,
                     "slots_per_s": last["slots"] / wall, "peak_mib": memory[side]["peak_mib"] - memory[side]["baseline_mib"],
                     "abs_peak_mib": memory[side]["peak_mib"], "steps": last["steps"], "real": last["real"],
                     "slots": last["slots"], "mean_loss": last["mean_loss"], "losses": [last["first_loss"], last["last_loss"]],
                     "grad_norms": last["grad_norms"], "moved": [None]}
    return out


def report(epochs: dict, warm: dict, memory: dict, data: dict, settings: dict, device: str, precision: str) -> str:
    """The markdown block: machine, settings, notes and the table."""
    names = {"ours-packed": "ours, packed", "ours-padded": "ours, padded", "trl-padded": "trl SFTTrainer, padded",
             "trl-packed": "trl SFTTrainer, packed (bfd, padding-free)"}
    rows, fig = [], figures(epochs, memory)
    for side, f in fig.items():
        rows.append(
            f"| {names[side]} | {f['steps']} | {f['real']} | {f['slots']} | {1 - f['real'] / f['slots']:.1%} "
            f"| {f['epoch_s']:.1f} | **{f['tokens_per_s']:.0f}** | {f['slots_per_s']:.0f} | {f['real_per_cpu_s']:.0f} "
            f"| {f['peak_mib']:.0f} | {f['abs_peak_mib']:.0f} | {warm[side]['loss']:.4f} | {f['mean_loss']:.4f} |")
    info = settings["machine"]
    ratios = ", ".join(f"{names[s]} {fig[s]['tokens_per_s'] / fig['trl-padded']['tokens_per_s']:.2f}x"
                       for s in fig if s != "trl-padded")
    lines = [
        f"- Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB, torch.set_num_threads({THREADS}) in "
        f"every process (children report {sorted({m['threads'] for m in memory.values()})}); {device}"
        f"{' (' + str(info['gpu']) + ')' if device == 'cuda' else ''}; Python {info['python']}, "
        f"{mem.versions_text(info)}; {mem.machine_bf16(info)}; precision {precision}: {mem.precision_text(precision)} "
        f"(trl bf16={precision != 'fp32'}).",
        f"- Model: hidden {ARCH['hidden_size']}, {ARCH['num_hidden_layers']} layers, {ARCH['num_attention_heads']} heads, "
        f"{ARCH['num_key_value_heads']} KV heads, intermediate {ARCH['intermediate_size']}, vocab {ARCH['vocab_size']} "
        f"(the real v1 tokenizer), untied head, SDPA: {data['n_params'] / 1e6:.1f} M parameters, the same initial "
        "weights on every side.",
        f"- Data: {data['examples']} synthetic conversations of 1-{MAX_TURNS} turns stitched from the bundled tiny_chat "
        f"rows, {data['min']}-{data['max']} tokens (median {data['median']}), {data['tokens']} tokens of which "
        f"{data['labels']} are assistant labels; {data['truncated']} truncated, {data['dropped']} dropped. One epoch per "
        f"side. Packed: {data['packed_rows']} rows of at most {MAX_LEN} tokens (ours: `pack_examples`; trl: its own bfd), "
        f"{PACKED_ROWS} rows per step; padded: {PADDED_BATCH} examples per step, right-padded to the longest of the step "
        "(both padded sides get the same batches in the same order).",
        f"- Every side: AdamW lr {LR} (cosine to 0 over the epoch, no warmup), weight decay {WEIGHT_DECAY}, clip {CLIP}; "
        "no gradient/activation checkpointing, no PEFT, no accumulation. trl also computes its per-step entropy and "
        "token-accuracy metrics (part of its cost as shipped).",
        "- Timing: each side warms up with one optimizer step, then the timed epoch(s) run side after side. Ours "
        "includes collation; trl's runs from on_train_begin to on_train_end (its collation included; dataset "
        "preparation and optimizer creation excluded, as our packing and optimizer creation are). "
        f"Median of {settings['repeats']} epoch(s) per side. Epoch seconds: "
        + "; ".join(f"{s} " + ", ".join(f"{r['s']:.1f}" for r in runs) for s, runs in epochs.items()) + ". "
        "Real tokens per CPU-second (process CPU time, all threads) is less sensitive to other load than wall time.",
        mem.memory_note(list(memory.values())) + " Read after the epochs (optimizer state, activations, data included).",
        f"- Real-token throughput relative to trl padded: {ratios}.",
        mem.trained_note(fig).replace("weights moved every step: not probed", "loss first -> last step of the epoch"),
        *mem.run_notes(settings),
        "",
        "| Side | Steps | Real tokens | Token slots | Padding share | Epoch s | Real tokens/s | Slots/s (pads included) "
        "| Real tokens per CPU-s | Peak memory over model, MiB | Absolute peak memory, MiB | First-step loss | Mean epoch loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=1, help="timed epochs per side (median reported)")
    parser.add_argument("--no-trl-packed", action="store_true", help="skip trl's packed side")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--precision", choices=mem.PRECISIONS, help="default fp32 on CPU, bf16-autocast on CUDA")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_EXAMPLES} examples: a smoke test")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.device = mem.pick_device(args.device)
    args.precision = args.precision or ("bf16-autocast" if args.device == "cuda" else "fp32")
    if args.child:
        serve_side(args.child, args.out, args.device, args.precision)
        return

    torch.set_num_threads(THREADS)
    sides = [s for s in SIDES if not (args.no_trl_packed and s == "trl-packed")]
    clock = mem.RunClock(__file__)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        data = prepare(out, QUICK_EXAMPLES if args.quick else args.examples)
        print(f"[bench] {data['examples']} examples, {data['tokens']} tokens; building {sides}", file=sys.stderr, flush=True)
        argvs = {s: [__file__, "--child", s, "--out", str(out), "--device", args.device, "--precision", args.precision]
                 for s in sides}
        with mem.children_of(argvs) as children:
            warm = {s: child.ask("warmup") for s, child in children.items()}
            epochs = {s: [] for s in sides}
            for r in range(args.repeats):
                for side in sides[r % len(sides):] + sides[: r % len(sides)]:
                    print(f"[bench] epoch {r + 1}: {side}", file=sys.stderr, flush=True)
                    epochs[side].append(children[side].ask("epoch"))
            memory = {s: child.ask("memory") for s, child in children.items()}
    settings = {"repeats": args.repeats, **clock.finish()}
    payload = {"bench": "sft", "device": args.device, "precision": args.precision, "arch": ARCH, "max_len": MAX_LEN, "data": data,
               "sides": figures(epochs, memory), "run": settings}
    mem.emit(report(epochs, warm, memory, data, settings, args.device, args.precision), payload)


if __name__ == "__main__":
    main()
