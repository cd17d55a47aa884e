"""Benchmark LoRA and QLoRA SFT training steps: ours vs transformers + peft (+ bitsandbytes NF4 for QLoRA).

One step = forward + backward of the LM loss (labels = input ids) + clip + AdamW step, on the
same model (the ARCH of _bench_common.py), the same weights and adapter (scripts/_bench_models.py:
one HF folder and one PEFT adapter, loaded by both sides), the same batch:
- ours: `Mistral.from_pretrained` (+ `quantize="nf4"` for QLoRA) + `load_adapter`, stepped as
  fit() steps (`backward_window`, clip, `build_optimizer`'s AdamW);
- theirs: `AutoModelForCausalLM.from_pretrained` (+ `BitsAndBytesConfig(load_in_4bit=True, nf4,
  double quant)` for QLoRA; on CPU `support_avx512bf16_for_cpu=False` on every Linear4bit, see
  STACK-NOTES) + `PeftModel.from_pretrained(is_trainable=True)`, plain loop, fused AdamW
  (transformers' default optimizer).
Per (kind, shape) the two sides are children of their own (clean peak memory), stepped round-robin.
--precision: fp32 (the CPU default); bf16-autocast (fp32 weights, torch.autocast(bf16) around forward and
backward on both sides; QLoRA's compute dtype stays fp32 on both and autocast runs the matmuls in bf16);
bf16 (base weights and compute dtype bf16; our adapters bf16 too, stepped with trainer.bf16_update's
default Kahan AdamW; peft keeps its adapters in fp32 (autocast_adapter_dtype, its default) under plain
fused AdamW). On CUDA the default is bf16 (flash-attn for transformers when installed), peak memory then
from torch.cuda.max_memory_allocated. Prints a markdown block and a JSON line for bench_all.py.

    python scripts/bench_lora.py [--shapes 512x4,2048x2] [--kinds lora,qlora] [--warmup 1] [--steps 3]
                                 [--precision fp32|bf16-autocast|bf16] [--device cpu|cuda|auto] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared bench helpers beside this file
import _bench_common as mem  # noqa: E402
import _bench_models as models  # noqa: E402

from mistral_train.train.loop import backward_window  # noqa: E402
from mistral_train.train.steps import language_model  # noqa: E402

SIDES = ("ours", "peft")
SHAPES, QUICK_SHAPES = "512x4,2048x2", "64x2,128x2"  # seq x batch
NAMES = {"lora": "LoRA", "qlora": "QLoRA (NF4)"}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"512x4,2048x2" -> [(512, 4), (2048, 2)]: (sequence length, rows per step)."""
    try:
        return [(int(seq), int(batch)) for seq, batch in (part.split("x") for part in text.split(","))]
    except ValueError as err:
        raise ValueError(f"--shapes {text!r}: expected SEQxBATCH[,SEQxBATCH...], e.g. 512x4,2048x2") from err


def serve_side(side: str, kind: str, seq: int, batch: int, folder: Path, args: argparse.Namespace) -> None:
    """Child process of one side: build the model, then serve "step" and "memory"."""
    torch.set_num_threads(mem.THREADS)
    device, dtype, autocast = args.device, mem.weight_dtype(args.precision), mem.autocast(args.precision, args.device)
    ids = torch.randint(0, args.arch["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    if side == "ours":
        model = models.ours(folder, kind, device, dtype).train()
        optimizer, objective = models.our_optimizer(model, device), language_model()

        def forward_backward() -> float:
            return backward_window(model, objective, [{"input_ids": ids, "labels": ids}], autocast)[0]
    else:
        model = models.theirs(folder, kind, device, dtype).train()
        optimizer = models.their_optimizer(model)

        def forward_backward() -> float:
            with autocast():  # the forward only, as backward_window (and torch's AMP recipe) does
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            return loss.item()
    models.serve_training_steps(forward_backward, optimizer, model, device)


def report(rows: list[dict], args: argparse.Namespace, settings: dict) -> str:
    arch, info = args.arch, settings["machine"]
    table = models.comparison_table([(f"{NAMES[r['kind']]}, seq {r['seq']} x batch {r['batch']}", r["ours"], r["peft"])
                                  for r in rows], "peft")
    steps = "; ".join(f"{r['kind']} {r['seq']}: ours " + ", ".join(f"{t:.2f}" for t in r["ours"]["step_s"])
                      + " / peft " + ", ".join(f"{t:.2f}" for t in r["peft"]["step_s"]) for r in rows)
    precision, dtype = args.precision, str(mem.weight_dtype(args.precision)).removeprefix("torch.")
    lines = [
        f"- Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB, torch.set_num_threads({mem.THREADS}) "
        f"in every process; {args.device}{' (' + str(info['gpu']) + ')' if args.device == 'cuda' else ''}; Python "
        f"{info['python']}, {mem.versions_text(info)}; {mem.machine_bf16(info)}; precision {precision}: "
        f"{mem.precision_text(precision)}.",
        f"- Model: hidden {arch['hidden_size']}, {arch['num_hidden_layers']} layers, {arch['num_attention_heads']} heads, "
        f"{arch['num_key_value_heads']} KV heads, intermediate {arch['intermediate_size']}, vocab {arch['vocab_size']}, "
        "untied head; the same base weights and adapter on both sides (one HF folder, one PEFT adapter).",
        f"- {models.lora_text()}. QLoRA: NF4, blocksize 64, double quantization, compute dtype {dtype}; "
        f"transformers attention: {models.attention_implementation(args.device)}"
        + ("" if args.device == "cuda" or importlib.util.find_spec("kernels") else
           "; bitsandbytes runs its CPU 4-bit matmul without the optional `kernels` package (it says so at import), "
           "i.e. as installed here") + ".",
        f"- One step = forward + backward + clip + AdamW step, labels = input ids; {args.warmup} warm-up + {args.steps} "
        f"timed steps per side, round-robin; tokens/s of the median timed step. Step seconds (warm-up first): {steps}.",
        mem.memory_note([r[side]["memory"] for r in rows for side in SIDES]),
        *(mem.trained_note({side: r[side] for side in SIDES}).replace(
            "- Trained", f"- Trained, {NAMES[r['kind']]} seq {r['seq']}", 1) for r in rows),
        *(mem.profile_note({side: r[side]["profile"] for side in SIDES}).replace(
            "- Profile", f"- Profile, {NAMES[r['kind']]} seq {r['seq']} x batch {r['batch']}", 1) for r in rows),
    ]
    return "\n".join(lines + mem.run_notes(settings) + ["", *table])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", help=f"SEQxBATCH list (default {SHAPES}; {QUICK_SHAPES} with --quick)")
    parser.add_argument("--kinds", default="lora,qlora", help="lora, qlora or both")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--precision", choices=mem.PRECISIONS, help="default fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--quick", action="store_true", help="tiny model and shapes, 1 step: a smoke test")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--group", help=argparse.SUPPRESS)  # KIND:SEQxBATCH of a child
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.device, args.arch = mem.pick_device(args.device), mem.QUICK_ARCH if args.quick else mem.ARCH
    args.precision = args.precision or mem.default_precision(args.device)
    if args.quick:
        args.warmup, args.steps = 0, 1
    shapes = parse_shapes(args.shapes or (QUICK_SHAPES if args.quick else SHAPES))
    kinds = args.kinds.split(",")
    if not set(kinds) <= set(NAMES):
        raise ValueError(f"--kinds {args.kinds!r}: expected a comma-separated subset of {sorted(NAMES)}")
    if args.child:
        kind, shape = args.group.split(":")
        (seq, batch), = parse_shapes(shape)
        serve_side(args.child, kind, seq, batch, args.dir, args)
        return

    torch.set_num_threads(mem.THREADS)
    clock = mem.RunClock(__file__)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models.write_models(Path(tmp), args.arch)
        for kind in kinds:
            for seq, batch in shapes:
                print(f"[bench] {kind}, seq {seq} x batch {batch}", file=sys.stderr, flush=True)
                child = ["--group", f"{kind}:{seq}x{batch}", "--dir", tmp]
                results = mem.compare_steps({s: [__file__, *sys.argv[1:], "--child", s, *child] for s in SIDES},
                                            args.warmup + args.steps, profile=True)
                row = {"kind": kind, "seq": seq, "batch": batch}
                for side in SIDES:
                    row[side] = {**mem.summarize(results[side], seq * batch, args.warmup), "memory": results[side]["memory"]}
                rows.append(row)
    settings = clock.finish()
    payload = {"bench": "lora", "device": args.device, "precision": args.precision, "arch": args.arch, "lora": models.LORA, "rows": rows, "run": settings}
    mem.emit(report(rows, args, settings), payload)


if __name__ == "__main__":
    main()
