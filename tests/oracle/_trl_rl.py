"""What the online-RL trainer oracles (test_grpo_trainer_parity.py, test_rloo_trainer_parity.py) share.

The two sides must see identical rollouts, so neither samples: a fixed table of completions (`COMPLETIONS`,
chosen per prompt row and per place in its group) is fed to trl by replacing `_generate_single_turn`, and to
us by replacing `mistral_train.rollout.sampling.generate_completions` (the shared design's hook). Prompts are
conversational rows (trl's prompt-only format) tokenized once by OUR tokenizer's chat template: the v1
SentencePiece file as a transformers tokenizer has no chat template, so trl's `_tokenize_prompts` is replaced
by ours too. Everything after that is trl's own code: rewards (`_calculate_rewards`, the plain functions
below, which also read the row's `answer` column), advantages, old and reference log-probs, the loss, the
Trainer's accumulation, clipping and AdamW step.

Two trl behaviours are switched off because they are not part of the maths being compared:
- trl shuffles each generation batch (`shuffle_sequence_dict`, a torch.randperm over the whole window)
  before splitting it into micro-batches; we keep the prompts' order, so the shuffle is patched to the
  identity. (Only `bnpo`, whose normaliser is the micro-batch's token count, depends on the composition.)
- trl's sampler shuffles prompts unless `shuffle_dataset=False`; our epochs are shuffled with trainer.seed.
  So our run goes first, records which prompts each rollout drew, and trl then reads the rows in that order
  (`rows_in_our_order`): the comparison is of the step maths, not of two shufflers.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable, Optional
from unittest import mock

import pytest
import torch

from tests._tokenizers import bundled, with_tokenizer_model

__all__ = ["ACCUM", "BATCH", "G", "MAX_COMPLETION", "REWARD_FUNCS", "REWARD_WEIGHTS", "ROWS", "STEPS", "TOL", "brevity",
           "compare", "completion_ids", "completion_table", "exact_answer", "fixed_generate_completions",
           "model_folder", "our_run", "our_tokenizer", "prompt_ids_of", "rewards_of", "rows_in_our_order", "trl_run",
           "write_rows"]

G = 2  # completions per prompt (num_generations)
BATCH = 4  # completions per micro-batch: BATCH // G = 2 prompts
ACCUM = 2  # micro-batches per optimizer step: a rollout window of 4 prompts, 8 completions
STEPS = 3
MAX_COMPLETION = 8  # tokens; the longer candidates below are cut there without EOS (truncated)

# Conversational prompts (trl's prompt-only format) with an `answer` column the exact-match reward reads.
ROWS = [{"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}], "answer": str(a + b)}
        for a, b in [(2, 2), (3, 5), (1, 6), (7, 2), (4, 4), (9, 1), (6, 5), (2, 8), (5, 7), (3, 3), (8, 1), (4, 9)]]


def _candidates(answer: str) -> list[str]:
    """Replies of several lengths: right, right but wordy, wrong, and long enough to be truncated."""
    return [answer, f"It is {answer}.", str(int(answer) + 1), "I am not sure, let me think about it a while."]


@functools.lru_cache(maxsize=1)
def our_tokenizer():
    return bundled("v1")


def prompt_ids_of(row: dict) -> list[int]:
    """The prompt's token ids as both sides train on them: our v1 chat template, ending with [/INST]."""
    return our_tokenizer().apply_chat_template(row["prompt"])


def completion_ids(text: str, eos_id: int) -> list[int]:
    """A completion as generation would leave it: the reply's tokens and EOS, cut at MAX_COMPLETION tokens
    (a cut completion has no EOS: it is truncated)."""
    return (our_tokenizer().encode(text) + [eos_id])[:MAX_COMPLETION]


def completion_table(rows: list[dict], eos_id: int) -> dict[tuple[int, ...], list[list[int]]]:
    """prompt ids -> its G completions (ids). Row r's j-th completion is candidate (r + j) % 4, so every
    group mixes rewards, except row 4's, whose two completions are equal (a zero-spread group)."""
    table = {}
    for r, row in enumerate(rows):
        texts = _candidates(row["answer"])
        picks = [1, 1] if r == 4 else [(r + j) % len(texts) for j in range(G)]
        table[tuple(prompt_ids_of(row))] = [completion_ids(texts[k], eos_id) for k in picks]
    return table


# Reward functions, written as trl users write them: keyword arguments, extra columns by name. trl passes a
# conversational completion as [{"role": "assistant", "content": ...}]; our RewardSet passes the text.
def _text(completion: Any) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def exact_answer(prompts: list, completions: list, answer: list[str], **kwargs: Any) -> list[float]:
    return [1.0 if _text(c).strip() == a else 0.0 for c, a in zip(completions, answer)]


def brevity(prompts: list, completions: list, **kwargs: Any) -> list[Optional[float]]:
    """No score (None, NaN in the reward matrix) for the hedging reply: trl's nansum/nanmean paths run."""
    return [None if _text(c).startswith("I am not sure") else -len(_text(c)) / 10.0 for c in completions]


REWARD_FUNCS = [exact_answer, brevity]
REWARD_WEIGHTS = [1.0, 0.5]


def write_rows(path: Path, rows: list[dict] = ROWS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _fixed_generation(table: dict, with_num_generations: bool) -> Callable:
    """A `_generate_single_turn` replacement: trl hands it each prompt G times in a row (RepeatSampler), and it
    returns the table's completions in that order (GRPO's returns (ids, logprobs); RLOO's only ids)."""

    def generate(prompt_ids, images, multimodal_fields, *args, **kwargs):
        seen: dict[tuple[int, ...], int] = {}
        out = []
        for ids in prompt_ids:
            key = tuple(ids)
            j = seen.get(key, 0)
            seen[key] = j + 1
            out.append(list(table[key][j]))
        return (out, None) if with_num_generations else out

    return generate


def _our_prompt_tokens(prompts: list) -> tuple[list[list[int]], None, dict]:
    return [our_tokenizer().apply_chat_template(p) for p in prompts], None, {}


def trl_run(kind: str, folder: Path, tokenizer, rows: list[dict], output_dir: Path, table: dict,
            **config: Any) -> tuple[list[dict], dict[str, torch.Tensor], Any]:
    """`STEPS` steps of trl's GRPOTrainer (kind "grpo") or RLOOTrainer ("rloo") on `folder`'s model over
    `rows` in order, generation replaced by `table`. Returns (per-step logs, final weights, the trainer)."""
    import datasets
    import transformers
    import trl
    from trl.trainer import grpo_trainer, rloo_trainer

    from tests.oracle._trl_helpers import TRL_ON_CPU

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    Config, Trainer, module = ((trl.GRPOConfig, trl.GRPOTrainer, grpo_trainer) if kind == "grpo"
                               else (trl.RLOOConfig, trl.RLOOTrainer, rloo_trainer))
    args = Config(output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=BATCH,
                  gradient_accumulation_steps=ACCUM, num_generations=G, max_completion_length=MAX_COMPLETION,
                  shuffle_dataset=False, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
                  logging_steps=1, reward_weights=REWARD_WEIGHTS, log_completions=False, **TRL_ON_CPU, **config)
    trainer = Trainer(model=model, reward_funcs=REWARD_FUNCS, args=args,
                      train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)
    trainer._tokenize_prompts = _our_prompt_tokens
    trainer._generate_single_turn = _fixed_generation(table, with_num_generations=kind == "grpo")
    with mock.patch.object(module, "shuffle_sequence_dict", lambda d: d):
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return logs, weights, trainer


def model_folder(hf_model, tiny, folder: Path) -> Path:
    """The seeded tiny transformers Mistral (real 32000-token vocabulary) with the v1 tokenizer.model beside it
    (our fit() reads the tokenizer from the model folder; trl is handed its own)."""
    from tests.oracle._trl_helpers import tiny_folder

    tiny_folder(hf_model, tiny, folder)
    return with_tokenizer_model(folder)


def rewards_of(rows: list[dict], table: dict, eos_id: int, decode: Optional[Callable] = None) -> torch.Tensor:
    """(N, 2) rewards of the rows' completions in rollout order, by the reward functions on decoded text
    (NaN where a function gave None)."""
    decode = decode or (lambda ids: our_tokenizer().decode(ids))
    out = []
    for row in rows:
        texts = [decode(ids) for ids in table[tuple(prompt_ids_of(row))]]
        scores = [exact_answer(None, texts, [row["answer"]] * G), brevity(None, texts)]
        out.append(torch.tensor([[float("nan") if v is None else v for v in col] for col in scores]).T)
    return torch.cat(out).float()


def fixed_generate_completions(table: dict, calls: list):
    """A `mistral_train.rollout.sampling.generate_completions` replacement: the table's completions of each
    (left-padded) prompt, G consecutive rows per prompt, cut and padded as ours would leave them.
    Each call's unpadded prompts are appended to `calls` (the test checks which prompts each rollout saw)."""
    from mistral_train.rollout.sampling import completions_from_tokens

    def generate_completions(model, prompt_ids, prompt_mask, spec, eos_token_id, pad_id, generator, engine=None):
        prompts = [tuple(row[keep.bool()].tolist()) for row, keep in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        calls.append(prompts)
        assert spec.num_generations == G and spec.max_completion_length == MAX_COMPLETION
        rows = [ids for prompt in prompts for ids in table[prompt]]  # prompt i's group at rows i*G..i*G+G-1
        width = max(len(ids) for ids in rows)
        tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for i, ids in enumerate(rows):
            tokens[i, : len(ids)] = torch.tensor(ids)
        return completions_from_tokens(tokens.to(prompt_ids.device), eos_token_id, pad_id)

    return generate_completions


def our_run(objective: str, folder: Path, data: Path, run_dir: Path, table: dict, grpo: dict,
            **trainer: Any) -> tuple[list[dict], dict[str, torch.Tensor], list]:
    """fit() with trainer.objective=`objective` on `folder` over the rows in `data`, generation replaced by
    `table`. Returns (metrics.jsonl's step rows, final/ weights, the prompts of each rollout call)."""
    from safetensors.torch import load_file

    from mistral_train.config import DataSpec, GRPOSpec, ModelSpec, RunConfig, RunSpec, TrackingSpec, TrainerSpec
    from mistral_train.rollout import sampling
    from mistral_train.train import fit

    spec = GRPOSpec(num_generations=G, max_completion_length=MAX_COMPLETION,
                    reward_funcs=[f"{__name__}:{f.__name__}" for f in REWARD_FUNCS], reward_weights=REWARD_WEIGHTS,
                    **grpo)
    cfg = RunConfig(
        model=ModelSpec(path=str(folder)), data=DataSpec(path=str(data), format="prompt_only", packing=False),
        trainer=TrainerSpec(objective=objective, max_steps=STEPS, max_seq_len=256, batch_size=BATCH,
                            grad_accum_steps=ACCUM, min_lr_ratio=1.0, warmup_steps=0, optimizer="adamw",
                            log_every=1, eval_max_new_tokens=0, sample_max_new_tokens=1, device="cpu", grpo=spec,
                            **trainer),
        run=RunSpec(name=run_dir.name, dir=str(run_dir.parent)), tracking=TrackingSpec(progress_bar=False, plot=False))
    calls: list = []
    with mock.patch.object(sampling, "generate_completions", fixed_generate_completions(table, calls)):
        out = fit(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r and r.get("step", 0) >= 1]
    weights = {}
    for file in sorted((out / "final").glob("*.safetensors")):
        weights.update(load_file(file))
    return steps, weights, calls


# Per-step loss, grad norm (relative), metrics, and each final weight tensor's difference relative to its update.
# Elementwise the weights get 10 * TOL: AdamW divides by sqrt(v), which amplifies fp32 rounding in the few
# elements whose gradients nearly cancel over the steps (measured: with dapo and sequence-level ratios, 2 of
# lm_head's 2M elements 2.4e-4 apart while the losses agreed to 7e-7 and the grad norms to 3e-6, all other
# elements < 3e-5; RLOO beta 0.05: 1.1e-4 at most, 4e-5 of the update).
TOL = 1e-4
NOT_COMPARED = {"step", "epoch", "step_time", "learning_rate", "lr", "grad_norm", "loss"}  # epoch: trl counts repeats


def compare(ours: list[dict], theirs: list[dict], our_weights: dict, trl_weights: dict, initial: dict, what: str,
            required: tuple[str, ...]) -> None:
    """The training first (per-step loss, pre-clip grad norm, lr; every final weight, which must have moved far
    more than the tolerance), then every metric both sides logged at each step (trl logs the reward metrics
    only on steps that generated), `required` among them at step 1."""
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == list(range(1, STEPS + 1)), what
    for mine, ref in zip(ours, theirs):
        where = f"{what}, step {ref['step']}"
        assert mine["loss"] == pytest.approx(ref["loss"], abs=TOL), \
            f"{where}: loss ours {mine['loss']}, trl {ref['loss']}"
        assert mine["grad_norm"] == pytest.approx(ref["grad_norm"], rel=TOL), \
            f"{where}: grad norm ours {mine['grad_norm']}, trl {ref['grad_norm']}"
        assert mine["lr"] == pytest.approx(ref["learning_rate"], rel=1e-9), f"{where}: lr"
    assert set(our_weights) == set(trl_weights), what
    worst, worst_relative, moved = 0.0, 0.0, 0.0
    for key, theirs_w in trl_weights.items():
        update, diff = theirs_w - initial[key], our_weights[key].float() - theirs_w
        worst, moved = max(worst, float(diff.abs().max())), max(moved, float(update.abs().max()))
        worst_relative = max(worst_relative, float(diff.norm() / update.norm()))
    assert worst_relative < TOL, f"{what}: final weights differ by {worst_relative:.2e} of their update (a tensor)"
    assert worst < 10 * TOL, f"{what}: a final weight differs by {worst:.2e}"
    assert moved > 100 * TOL, f"{what}: the weights barely moved ({moved:.2e})"
    print(f"{what}: final weights: max |ours - trl| {worst:.2e}, relative to the update {worst_relative:.2e} "
          f"(moved up to {moved:.2e}); max |loss difference| "
          f"{max(abs(m['loss'] - r['loss']) for m, r in zip(ours, theirs)):.2e}; trl losses "
          f"{[round(r['loss'], 6) for r in theirs]}")
    for mine, ref in zip(ours, theirs):
        where = f"{what}, step {ref['step']}"
        shared = set(ref) & set(mine) - NOT_COMPARED
        if ref["step"] == 1:
            assert set(required) <= shared, f"{where}: not logged by us: {set(required) - shared}"
        for key in sorted(shared):
            assert mine[key] == pytest.approx(ref[key], abs=TOL), f"{where}: {key} ours {mine[key]}, trl {ref[key]}"


def rows_in_our_order(calls: list, windows: int) -> list[dict]:
    """ROWS in the order our rollouts drew them (our epoch is shuffled with trainer.seed; trl reads its dataset
    in order with shuffle_dataset=False), the unseen rows after them. Checks each window was one rollout call
    of 4 distinct prompts, or calls of whole micro-batches adding up to it."""
    by_prompt = {tuple(prompt_ids_of(r)): r for r in ROWS}
    seen = [p for call in calls for p in call]
    assert len(seen) == windows * BATCH * ACCUM // G and len(set(seen)) == len(seen), f"our rollouts drew {calls}"
    return [by_prompt[p] for p in seen] + [r for p, r in by_prompt.items() if p not in set(seen)]


def trl_score_window(scores: torch.Tensor, weights: torch.Tensor, names: list[str], num_generations: int,
                     scale_rewards: str) -> tuple[dict, dict]:
    """trl 1.16's own reward combination and advantages: `GRPOTrainer._generate_and_score_completions` called
    unbound on a stand-in trainer whose generation returns fixed completions and whose `_calculate_rewards`
    returns `scores` (N, F); the weighting, nansum, unscorable rows and group/batch statistics after it are
    trl's code. Returns (its output: "advantages", ...; its logged train metrics: "reward", ...)."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl.trainer.grpo_trainer import GRPOTrainer

    n = scores.shape[0]
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(device="cpu", num_processes=1, process_index=0, is_main_process=False,
                                    gather=lambda t: t, gather_for_metrics=lambda t: t,
                                    reduce=lambda t, reduction="sum": t),
        model=SimpleNamespace(training=True, is_gradient_checkpointing=False),
        environment_factories=None, tools=None, environments=None, _is_vlm=False, beta=0.0,
        _generate=lambda prompts: ([[1, 2]] * n, [[5, 6, 2]] * n, None, ["x"] * n, None, {}, None, None),
        _tokenizer=SimpleNamespace(pad_token_id=0), pad_to_multiple_of=None, mask_truncated_completions=False,
        args=SimpleNamespace(per_device_train_batch_size=n, gradient_checkpointing_kwargs=None,
                             steps_per_generation=1, gradient_accumulation_steps=1),
        num_iterations=1, use_vllm=False, vllm_importance_sampling_correction=False,
        _calculate_rewards=lambda *a: scores.clone(), num_generations=num_generations,
        multi_objective_aggregation="sum_then_normalize", reward_weights=weights, scale_rewards=scale_rewards,
        reward_func_names=names, _metrics={"train": defaultdict(list)},
        _logs=defaultdict(list, rewards=defaultdict(list)), _pending_extra_logs={}, _pending_metrics={},
    )
    out = GRPOTrainer._generate_and_score_completions(trainer, [{"prompt": "p"}] * n)
    return out, trainer._metrics["train"]
