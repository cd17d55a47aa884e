"""Benchmark a DPO step: ours vs trl.DPOTrainer, per kind of reference policy, same model, batch and settings.

Reference kinds (the same on both sides):
- copy             full fine-tuning, the reference a frozen copy of the starting model
                   (ours: `build_reference("copy")`; trl: `ref_model=` a second load of the folder);
- adapter_off      a fresh LoRA adapter (scripts/_bench_models.py: r 16 on every linear), the reference
                   the base with adapters disabled (ours: `build_reference("adapter_off")`; trl: the
                   base model and `peft_config=`, so trl injects the adapter and disables it for the reference);
- initial_adapter  continuing a trained adapter, the reference that starting adapter, frozen (ours:
                   `build_reference("initial_adapter")`; trl: a PeftModel, to which trl adds a "ref" copy);
- precomputed      full fine-tuning, reference log-probs computed once before training, no reference
                   model while training (ours: `ref_logps` in the batch; trl: `precompute_ref_log_probs=True`).
One step = the reference pass (unless precomputed) + policy forward over the 2B sequences (chosen,
then rejected) + sigmoid DPO loss (beta 0.1) + backward + clip + AdamW step. Ours is what fit()
runs (`dpo_objective`, `backward_window`, `build_optimizer`); trl's is its own `training_step` on
its own collated batch, then the optimizer `create_optimizer` built (trl 1.16 refuses pre-tokenized
datasets in its constructor, so it is built on a 1-row text dataset and then reads our token ids,
as tests/oracle/test_dpo_trainer_parity.py does). Activation checkpointing is set the same on both
sides (`--grad-ckpt`; trl's own default is on). Data: B random-token pairs whose chosen sequence
fills `--seq` and whose rejected one is shorter (padded). --precision: fp32 (the CPU default);
bf16-autocast (fp32 weights; torch.autocast(bf16) around our backward_window and around trl's
training_step, which is what accelerate's bf16 mixed precision wraps the forward in; trl bf16=True);
bf16 (policy and reference weights bf16; ours steps them with trainer.bf16_update's default Kahan AdamW,
trl with the plain fused AdamW its Trainer builds; trl bf16=True). Prints markdown and a JSON line.

    python scripts/bench_dpo.py [--seq 1024] [--pairs 2] [--references copy,adapter_off,precomputed]
                                [--grad-ckpt off,on] [--warmup 1] [--steps 3] [--precision fp32|bf16-autocast|bf16]
                                [--device cpu|cuda|auto] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared bench helpers beside this file
import _bench_common as mem  # noqa: E402
import _bench_models as models  # noqa: E402

from mistral_train.config import DPOSpec  # noqa: E402
from mistral_train.data.preference import PreferencePair, collate_pairs  # noqa: E402
from mistral_train.train.loop import backward_window  # noqa: E402
from mistral_train.train.reference import build_reference  # noqa: E402
from mistral_train.train.steps import dpo_objective  # noqa: E402

SIDES = ("ours", "trl")
# reference kind -> (model kind, adapter folder)
REFERENCES = {"copy": ("full", None), "adapter_off": ("lora", "adapter0"), "initial_adapter": ("lora", "adapter"),
              "precomputed": ("full", None)}
BOS, EOS = 1, 2  # the v1 tokenizer's; EOS is also the pad id (trl pads with EOS when there is no pad token)
CHUNK = 1024  # our loss_chunk_size (the default)
BETA = 0.1


def make_pairs(n: int, seq: int, vocab: int) -> list[PreferencePair]:
    """`n` pairs of random ids: prompt 3/8 of `seq`, chosen filling `seq` (pair k: 16k shorter), rejected half of `seq`."""
    g = torch.Generator().manual_seed(0)
    prompt_len, pairs = seq * 3 // 8, []
    for k in range(n):
        ids = lambda length: torch.randint(3, vocab, (length,), generator=g).tolist()  # noqa: E731
        chosen, rejected = seq - prompt_len - 16 * k, seq // 2 - 16 * k
        pairs.append(PreferencePair([BOS] + ids(prompt_len - 1), ids(chosen - 1) + [EOS], ids(rejected - 1) + [EOS],
                                    "bench", k))
    return pairs


def our_step(reference: str, pairs: list[PreferencePair], folder: Path, args: argparse.Namespace):
    """(forward_backward, optimizer, model) of our DPO step for `reference`, as fit() builds them."""
    kind, adapter = REFERENCES[reference]
    model = models.ours(folder, kind, args.device, mem.weight_dtype(args.precision), adapter or "adapter").train()
    autocast = mem.autocast(args.precision, args.device)
    model.set_gradient_checkpointing(args.ckpt)
    batch = {k: v.to(args.device) for k, v in collate_pairs(pairs, EOS, packing=False, max_seq_len=args.seq).items()}
    ref = build_reference("copy" if reference == "precomputed" else reference, model, CHUNK)
    if reference == "precomputed":
        with autocast():
            batch["ref_logps"] = ref(model, batch)  # what fit()'s precompute does before step 1; then the copy goes
        ref = None
        gc.collect()
    objective = dpo_objective(DPOSpec(loss_type="sigmoid", beta=BETA, reference="copy"), ref, CHUNK)
    optimizer = models.our_optimizer(model, args.device)

    def step() -> float:
        return backward_window(model, objective, [batch], autocast)[0]

    return step, optimizer, model


def trl_step(reference: str, pairs: list[PreferencePair], folder: Path, args: argparse.Namespace):
    """(forward_backward, optimizer, model) of trl.DPOTrainer's step for `reference`."""
    import datasets
    import transformers
    import trl

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    dtype, autocast = mem.weight_dtype(args.precision), mem.autocast(args.precision, args.device)
    model = models.theirs(folder, "lora" if reference == "initial_adapter" else "full", args.device, dtype)
    ref_model = models.theirs(folder, "full", args.device, dtype) if reference == "copy" else None
    peft_config = models.peft_config() if reference == "adapter_off" else None
    config = trl.DPOConfig(
        output_dir=str(folder / f"trl-{reference}"), report_to=[], bf16=args.precision != "fp32", fp16=False,
        use_cpu=args.device == "cpu", seed=0, disable_tqdm=True, save_strategy="no", max_length=None,
        activation_checkpointing=args.ckpt, per_device_train_batch_size=len(pairs), learning_rate=models.LR,
        weight_decay=0.0, max_grad_norm=1.0, beta=BETA, loss_type=["sigmoid"],
        precompute_ref_log_probs=reference == "precomputed")
    placeholder = datasets.Dataset.from_list([{"prompt": "x", "chosen": "y", "rejected": "z"}])
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "tokenizer")
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries our answers
        trainer = trl.DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=placeholder,
                                 processing_class=tokenizer, peft_config=peft_config)
        dataset = datasets.Dataset.from_list([{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids,
                                               "rejected_ids": p.rejected_ids} for p in pairs])
        if reference == "precomputed":
            with autocast():
                dataset = trainer._precompute_ref_logps(dataset, "train", len(pairs))
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    if args.ckpt:  # what Trainer.train() does before its loop
        trainer.model.activation_checkpointing_enable(activation_checkpointing_kwargs=config.activation_checkpointing_kwargs)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # Trainer.train() sets it per window

    def step() -> float:
        with autocast():  # accelerate's bf16 autocast comes with Trainer.train()'s prepare(), not run here
            return trainer.training_step(trainer.model, batch).item()

    return step, trainer.optimizer, trainer.model


def serve_side(side: str, reference: str, folder: Path, args: argparse.Namespace) -> None:
    torch.set_num_threads(mem.THREADS)
    pairs = make_pairs(args.pairs, args.seq, args.arch["vocab_size"])
    forward_backward, optimizer, model = (our_step if side == "ours" else trl_step)(reference, pairs, folder, args)
    models.serve_training_steps(forward_backward, optimizer, model, args.device)


def report(rows: list[dict], args: argparse.Namespace, settings: dict, tokens: int) -> str:
    arch, info = args.arch, settings["machine"]
    names = {"copy": "full FT, frozen-copy reference", "adapter_off": "new LoRA, adapter-disabled reference",
             "initial_adapter": "continued LoRA, starting-adapter reference",
             "precomputed": "full FT, precomputed reference"}
    table = models.comparison_table([(f"{names[r['reference']]}, checkpointing {r['grad_ckpt']}", r["ours"], r["trl"])
                                  for r in rows], "trl")
    steps = "; ".join(f"{r['reference']}/{r['grad_ckpt']}: ours " + ", ".join(f"{t:.2f}" for t in r["ours"]["step_s"])
                      + " / trl " + ", ".join(f"{t:.2f}" for t in r["trl"]["step_s"]) for r in rows)
    lengths = sorted({len(p.prompt_ids) + len(a) for p in make_pairs(args.pairs, args.seq, arch["vocab_size"])
                      for a in (p.chosen_ids, p.rejected_ids)})
    lines = [
        f"- Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB, torch.set_num_threads({mem.THREADS}) "
        f"in every process; {args.device}{' (' + str(info['gpu']) + ')' if args.device == 'cuda' else ''}; Python "
        f"{info['python']}, {mem.versions_text(info)}; {mem.machine_bf16(info)}; precision {args.precision}: "
        f"{mem.precision_text(args.precision)}, trl bf16={args.precision != 'fp32'}.",
        f"- Model: hidden {arch['hidden_size']}, {arch['num_hidden_layers']} layers, {arch['num_attention_heads']} heads, "
        f"{arch['num_key_value_heads']} KV heads, intermediate {arch['intermediate_size']}, vocab {arch['vocab_size']}; "
        f"the same weights on both sides. LoRA rows: {models.lora_text()} (a new adapter starts with lora_B = 0; "
        f"trl injects its own, equal up to the random lora_A); full rows: AdamW lr {models.LR}, no decay.",
        f"- Batch: {args.pairs} pairs = {2 * args.pairs} sequences (padded to {args.seq}; lengths {lengths}), "
        f"{tokens} real tokens per step; sigmoid DPO, beta {BETA}; our loss_chunk_size {CHUNK}; trl computes its "
        "log-probs with its fused LM head and also its entropy/logit metrics (its cost as shipped).",
        f"- {args.warmup} warm-up + {args.steps} timed steps per side, round-robin; tokens/s of the median timed step. "
        f"Step seconds (warm-up first): {steps}.",
        mem.memory_note([r[side]["memory"] for r in rows for side in SIDES]) + " The frozen copy (and trl's "
        "reference load) is part of the built model; precomputed log-probs are computed before the reset.",
        *(mem.trained_note({side: r[side] for side in SIDES}).replace(
            "- Trained", f"- Trained, {r['reference']}/{r['grad_ckpt']}", 1) for r in rows),
        *(mem.profile_note({side: r[side]["profile"] for side in SIDES}).replace(
            "- Profile", f"- Profile, {r['reference']}/{r['grad_ckpt']}", 1) for r in rows),
    ]
    return "\n".join(lines + mem.run_notes(settings) + ["", *table])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, help="padded sequence length (default 1024; 128 with --quick)")
    parser.add_argument("--pairs", type=int, default=2, help="preference pairs per step")
    parser.add_argument("--references", default=",".join(REFERENCES))
    parser.add_argument("--grad-ckpt", help="activation checkpointing on both sides: off, on or off,on "
                                             "(default off,on; off with --quick)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--precision", choices=mem.PRECISIONS, help="default fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--quick", action="store_true", help="tiny model and batch, 1 step: a smoke test")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--group", help=argparse.SUPPRESS)  # REFERENCE:off|on of a child
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.device, args.arch = mem.pick_device(args.device), mem.QUICK_ARCH if args.quick else mem.ARCH
    args.seq = args.seq or (128 if args.quick else 1024)
    args.precision = args.precision or mem.default_precision(args.device)
    args.grad_ckpt = args.grad_ckpt or ("off" if args.quick else "off,on")
    if args.quick:
        args.warmup, args.steps = 0, 1
    references, settings_ckpt = args.references.split(","), args.grad_ckpt.split(",")
    if not set(references) <= set(REFERENCES) or not set(settings_ckpt) <= {"off", "on"}:
        raise ValueError(f"--references {args.references!r} must name some of {list(REFERENCES)}, "
                         f"--grad-ckpt {args.grad_ckpt!r} some of off,on")
    if args.child:
        reference, ckpt = args.group.split(":")
        args.ckpt = ckpt == "on"
        serve_side(args.child, reference, args.dir, args)
        return

    torch.set_num_threads(mem.THREADS)
    clock = mem.RunClock(__file__)
    pairs = make_pairs(args.pairs, args.seq, args.arch["vocab_size"])
    tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models.write_models(Path(tmp), args.arch)
        for ckpt in settings_ckpt:
            for reference in references:
                print(f"[bench] DPO, {reference} reference, checkpointing {ckpt}", file=sys.stderr, flush=True)
                child = ["--group", f"{reference}:{ckpt}", "--dir", tmp]
                results = mem.compare_steps({s: [__file__, *sys.argv[1:], "--child", s, *child] for s in SIDES},
                                            args.warmup + args.steps, profile=True)
                row = {"reference": reference, "grad_ckpt": ckpt, "seq": args.seq, "pairs": args.pairs}
                for side in SIDES:
                    row[side] = {**mem.summarize(results[side], tokens, args.warmup), "memory": results[side]["memory"]}
                rows.append(row)
    settings = clock.finish()
    payload = {"bench": "dpo", "device": args.device, "precision": args.precision, "arch": args.arch, "seq": args.seq, "pairs": args.pairs,
               "tokens_per_step": tokens, "rows": rows, "run": settings}
    mem.emit(report(rows, args, settings, tokens), payload)


if __name__ == "__main__":
    main()
