"""Benchmark one GRPO step (generation, rewards, update): ours vs trl.GRPOTrainer with transformers' generation,
the same model, prompts and settings; the time split between generation, rewards and update on each side.

One step = P prompts x G sampled completions (temperature 1, no top-k/top-p cut, up to C new tokens, stop at
EOS) + a reward function (trl's documented length reward, the same Python function on both sides) + group
advantages + the policy forward over prompt + completion + trl's default loss (dapo, beta 0, so no reference
and, with one iteration, no old log-probs: the ratio is exp(logp - logp.detach())) + backward + clip + AdamW.

- Ours: the training loop's grpo objective (train/online.py): its `draw` (the rollout: `generate_completions`,
  one batched KV-cache `generate` of the left-padded prompts, each repeated G times, timed alone; then decoding,
  the reward function named by import path, group advantages), then `train.loop.backward_window` over the
  window it returns (the grpo step: one chunked per-token log-prob forward, `grpo_loss`), clip and AdamW.
- trl: `GRPOTrainer._generate_and_score_completions` on the rows its sampler yields (each prompt G times;
  its `_generate` timed alone: the rest is tokenization, rewards and advantages), then its `compute_loss`,
  `accelerator.backward`, clip and its optimizer's step (what `training_step` + the optimizer step run).
Both sides run in this process, in turns (warm-up steps, then timed ones); each side checks that it trained
(a nonzero gradient norm and a weight that moved). Prints markdown and a JSON line.

    python scripts/bench_grpo.py [--prompts 4] [--generations 8] [--completion 64] [--warmup 1] [--steps 2]
                                 [--device cpu|cuda|auto] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared bench helpers beside this file
import _bench_common as mem  # noqa: E402
import _bench_models as models  # noqa: E402

from mistral_train import Mistral  # noqa: E402
from mistral_train.config import GRPOSpec  # noqa: E402

SIDES = ("ours", "trl")
PARTS = ("generation", "rewards", "update")
# hidden 256, 4 layers, Mistral's ratios (GQA 4 query / 2 KV heads) and the real 32000 vocabulary
ARCH = dict(mem.ARCH, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4)
QUICK_ARCH = dict(ARCH, num_hidden_layers=2)
PROMPTS = ["Write a short story about a dragon.", "Name three colours of the sea.", "Explain why the sky is blue.",
           "List some words that rhyme with cat.", "What is the capital of France?", "Count from one to five.",
           "Give a recipe for bread.", "Describe a quiet morning in the mountains."]
LR, CHUNK = 1e-5, 1024


def reward_len(completions: list, **kwargs) -> list[float]:
    """trl's documented example reward: completions near 20 characters score best. A completion is a string
    (trl's plain-text prompts) or, for conversational prompts (ours: canonical rows are message lists), the
    list of one assistant message, as trl passes it."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [-abs(20 - len(text)) / 20 for text in texts]


def weight_probe(model: torch.nn.Module) -> torch.Tensor:
    """A copy of one trained weight (the first layer's q_proj), to see it move."""
    return next(p for n, p in model.named_parameters() if "layers.0.self_attn.q_proj.weight" in n).detach().clone()


def grad_norm_and_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def our_side(folder: Path, args: argparse.Namespace) -> Callable[[], dict]:
    """One GRPO step of ours through the loop's grpo objective: its `draw` (rollout, rewards, advantages), then
    `backward_window` over the window it returns, clip and AdamW, as fit() runs them."""
    import transformers

    from mistral_train.rollout import sampling
    from mistral_train.rollout.rewards import build_rewards
    from mistral_train.tokenizer.tokenizer import load_tokenizer
    from mistral_train.train.loop import backward_window
    from mistral_train.train.online import Rollout, online_objective

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "tokenizer")  # trl's: the same prompt ids
    hf_tokenizer.pad_token = hf_tokenizer.eos_token  # as trl sets it when the tokenizer has none
    tokenizer = load_tokenizer(folder / "tokenizer")
    model = Mistral.from_pretrained(folder / "base").to(args.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    spec = GRPOSpec(num_generations=args.generations, max_completion_length=args.completion, temperature=1.0,
                    reward_funcs=["bench_grpo:reward_len"])  # by import path, as a config names it
    prompts = PROMPTS[: args.prompts]
    encoded = hf_tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    batch = {"prompt_ids": encoded["input_ids"], "prompt_mask": encoded["attention_mask"],
             "row_index": torch.arange(len(prompts))}  # a prompt batch as data/prompt_batches.py yields it
    rows = [{"prompt": [{"role": "user", "content": p}], "fields": {}} for p in prompts]
    eos = pad = hf_tokenizer.eos_token_id
    rollout = Rollout(spec, False, build_rewards(spec, tokenizer), lambda ids: tokenizer.decode(ids, skip_special=True),
                      rows, eos, pad, None, lambda m: m, lambda t: t, torch.device(args.device), contextlib.nullcontext,
                      CHUNK, seed=0)
    objective = online_objective(spec, False, CHUNK, rollout)
    generation_s, original = [], sampling.generate_completions

    def timed_generate(*a, **k):  # the objective looks it up through the module at call time
        seconds, result = mem.timed(lambda: original(*a, **k), args.device)
        generation_s.append(seconds)
        return result

    sampling.generate_completions = timed_generate

    def update(window, units) -> float:
        backward_window(model, objective, window, contextlib.nullcontext, n_tokens=units)
        return grad_norm_and_step(model, optimizer)

    def step() -> dict:
        before, generation_s[:] = weight_probe(model), []
        drawn, (window, units, _) = mem.timed(lambda: objective.draw(model, iter([batch]), 1), args.device)
        updating, norm = mem.timed(lambda: update(window, units), args.device)
        return {"generation": sum(generation_s), "rewards": drawn - sum(generation_s), "update": updating,
                "grad_norm": norm, "moved": bool((weight_probe(model) != before).any()),
                "completion_tokens": int(sum(b["completion_mask"].sum() for b in window))}

    return step


def trl_side(folder: Path, args: argparse.Namespace) -> Callable[[], dict]:
    """One GRPOTrainer step, split as our side is (see the module docstring)."""
    import datasets
    import transformers
    import trl

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    model = models.theirs(folder, "full", args.device, torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "tokenizer")
    n = args.prompts * args.generations
    config = trl.GRPOConfig(
        output_dir=str(folder / "trl"), report_to=[], bf16=False, fp16=False, use_cpu=args.device == "cpu", seed=0,
        disable_tqdm=True, save_strategy="no", per_device_train_batch_size=n, num_generations=args.generations,
        max_completion_length=args.completion, temperature=1.0, top_k=0, top_p=1.0, beta=0.0, loss_type="dapo",
        learning_rate=LR, weight_decay=0.0, max_grad_norm=1.0, logging_steps=10**6)
    dataset = datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS[: args.prompts]])
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries our answers
        trainer = trl.GRPOTrainer(model=model, reward_funcs=reward_len, args=config, train_dataset=dataset,
                                  processing_class=tokenizer)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # Trainer.train() sets it per window
    trainer.model.train()
    rows = [dataset[i] for i in range(args.prompts) for _ in range(args.generations)]  # its RepeatSampler's order
    generation_s = []
    original_generate = trainer._generate

    def timed_generate(*a, **k):
        seconds, result = mem.timed(lambda: original_generate(*a, **k), args.device)
        generation_s.append(seconds)
        return result

    trainer._generate = timed_generate  # the rest of _generate_and_score_completions: tokenizing, rewards, advantages

    def update(inputs) -> float:
        trainer.accelerator.backward(trainer.compute_loss(trainer.model, inputs))
        return grad_norm_and_step(trainer.model, trainer.optimizer)

    def step() -> dict:
        before = weight_probe(trainer.model)
        scored, inputs = mem.timed(lambda: trainer._generate_and_score_completions(rows), args.device)
        updating, norm = mem.timed(lambda: update(inputs), args.device)
        return {"generation": generation_s[-1], "rewards": scored - generation_s[-1], "update": updating,
                "grad_norm": norm, "moved": bool((weight_probe(trainer.model) != before).any()),
                "completion_tokens": int(inputs["completion_mask"].sum())}

    return step


def summarize(results: list[dict], warmup: int) -> dict:
    timed_steps = results[warmup:] or results
    median = {part: statistics.median(r[part] for r in timed_steps) for part in PARTS}
    return {**{f"{part}_s": median[part] for part in PARTS}, "step_s": sum(median.values()),
            "steps": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in results],
            "trained": all(r["grad_norm"] > 0 and r["moved"] for r in results),
            "completion_tokens": statistics.median(r["completion_tokens"] for r in timed_steps)}


def report(result: dict, args: argparse.Namespace, settings: dict) -> str:
    arch, info, ours, theirs = args.arch, settings["machine"], result["ours"], result["trl"]
    rows = ["| part | ours (s) | trl (s) | trl / ours |", "|---|---:|---:|---:|"]
    for part in (*PARTS, "step"):
        rows.append(f"| {part} | {ours[part + '_s']:.2f} | {theirs[part + '_s']:.2f} | "
                    f"{theirs[part + '_s'] / ours[part + '_s']:.2f}x |")
    trained = "; ".join(f"{side}: grad norms " + ", ".join(f"{r['grad_norm']:.3g}" for r in result[side]["steps"])
                        + f", weights moved: {all(r['moved'] for r in result[side]['steps'])}" for side in SIDES)
    lines = [
        f"- Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB, torch.set_num_threads({mem.THREADS}); "
        f"{args.device}; CPU capability {torch.backends.cpu.get_cpu_capability()}; Python {info['python']}, "
        f"{mem.versions_text(info)}; fp32 on both sides.",
        f"- Model: hidden {arch['hidden_size']}, {arch['num_hidden_layers']} layers, {arch['num_attention_heads']} heads, "
        f"{arch['num_key_value_heads']} KV heads, intermediate {arch['intermediate_size']}, vocab {arch['vocab_size']} "
        "(random init, the v1 tokenizer), the same weights on both sides; AdamW lr "
        f"{LR}, clip 1.0.",
        f"- Step: {args.prompts} prompts x {args.generations} completions, up to {args.completion} new tokens "
        f"(median completion tokens per step: ours {ours['completion_tokens']:.0f}, trl {theirs['completion_tokens']:.0f}), "
        "temperature 1, reward: trl's length example, loss dapo, beta 0, one iteration.",
        "- Ours: the loop's grpo objective (train/online.py): its draw (generate_completions timed alone; the rest: "
        "decoding, rewards, advantages), then backward_window, clip, AdamW step; trl: GRPOTrainer's "
        "_generate_and_score_completions (its _generate timed alone), compute_loss, backward, clip, optimizer step.",
        f"- {args.warmup} warm-up + {args.steps} timed steps per side, in turns; medians of the timed steps. Trained: "
        f"{trained}.",
    ]
    return "\n".join(lines + mem.run_notes(settings) + ["", *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--completion", type=int, default=64, help="max_completion_length")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--quick", action="store_true", help="2 layers, 2 prompts x 4, 16 tokens, 1 step")
    args = parser.parse_args()
    args.device, args.arch = mem.pick_device(args.device), QUICK_ARCH if args.quick else ARCH
    if args.quick:
        args.prompts, args.generations, args.completion, args.warmup, args.steps = 2, 4, 16, 0, 1
    if not 1 <= args.prompts <= len(PROMPTS):
        raise ValueError(f"--prompts {args.prompts}: between 1 and {len(PROMPTS)}")
    torch.set_num_threads(mem.THREADS)
    clock = mem.RunClock(__file__)
    with tempfile.TemporaryDirectory() as tmp:
        models.write_models(Path(tmp), args.arch)
        steps = {side: build(Path(tmp), args) for side, build in (("ours", our_side), ("trl", trl_side))}
        results: dict[str, list[dict]] = {side: [] for side in SIDES}
        for i in range(args.warmup + args.steps):
            for side in SIDES:
                print(f"[bench] GRPO step {i + 1}, {side}", file=sys.stderr, flush=True)
                results[side].append(steps[side]())
    result = {side: summarize(results[side], args.warmup) for side in SIDES}
    settings = clock.finish()
    payload = {"bench": "grpo", "device": args.device, "arch": args.arch, "prompts": args.prompts,
               "generations": args.generations, "max_completion_length": args.completion, **result, "run": settings}
    mem.emit(report(result, args, settings), payload)


if __name__ == "__main__":
    main()
