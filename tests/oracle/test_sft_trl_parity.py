"""Our SFT optimisation equals `trl.SFTTrainer`, step by step.

One tiny transformers Mistral is saved to a folder and loaded by both sides. Both train 10
optimizer steps in fp32 on the same pre-tokenized chat examples (our `tokenize_rows` with the
real v1 tokenizer; trl gets exactly those ids and the assistant mask as `assistant_masks`), in
the same order (trl's sampler set to sequential), padded per micro-batch, 2 micro-batches per
step, with the same AdamW (betas, eps, decay on the same parameters), clipping and schedule.

Our side runs the components `fit()` runs (build_optimizer, build_scheduler, the objective of
train/steps.py, the loop's `backward_window`, then the loop's clip / step / zero_grad /
scheduler.step). It does not call `fit()` itself: `fit()` accepts only `data.format=text` for now.

Checked: trl builds the same labels from the mask; the decayed parameter sets coincide; the
learning rate of every step; the logged loss of every step (trl logs the window's loss summed over
its label tokens and divided by their count over the whole window, as we do) to 1e-4; the
pre-clip gradient norm; the final weights. The examples differ in length and in label count per
micro-batch, so a per-micro-batch mean would be visibly different (asserted too).

Schedules: our warmup gives step s the factor (s+1)/w and our cosine reaches `min_lr_ratio` at the
last step; transformers' "cosine" starts warmup at 0 and reaches 0 one step after the last. They
coincide with no warmup and `num_cycles = 0.5 * T / (T - 1)`, which the run uses;
`test_lr_schedule_pieces_match_transformers` checks the warmup against transformers'
"cosine_warmup_with_min_lr" and the decay with warmup against "cosine".
"""

from __future__ import annotations

import contextlib
import math

import datasets
import pytest
import torch
import transformers
import trl

from mistral_train import Mistral
from mistral_train.config import DataSpec, TrainerSpec
from mistral_train.data.collate import collate_padded
from mistral_train.data.sft import tokenize_rows
from mistral_train.data.sources import load_rows
from mistral_train.losses.ce import IGNORE_INDEX
from mistral_train.train.loop import backward_window
from mistral_train.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups
from mistral_train.train.steps import language_model
from tests._tokenizers import bundled, with_tokenizer_model
from tests.oracle._trl_helpers import tiny_folder

STEPS, BATCH, ACCUM = 10, 2, 2
N_EXAMPLES = STEPS * BATCH * ACCUM  # exactly one epoch: trl would start over after it
SPEC = TrainerSpec(
    objective="pretrain", max_steps=STEPS, max_seq_len=256, batch_size=BATCH, grad_accum_steps=ACCUM,
    lr=3e-3, min_lr_ratio=0.0, warmup_steps=0, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,
    device="cpu",
)
EPS = 1e-8  # torch's AdamW default, which build_optimizer keeps
# Turn counts per conversation: 1 to 4 user/assistant pairs, a system turn on some, so lengths and
# label counts vary within and between micro-batches.
TURNS = (1, 3, 2, 4, 1, 2, 3, 1)


def chat_rows(n: int) -> list[dict]:
    """`n` multi-turn conversations built from consecutive bundled tiny_chat rows."""
    bundled = list(load_rows(DataSpec(format="messages")))
    rows, cursor = [], 0
    for i in range(n):
        k = TURNS[i % len(TURNS)]
        messages = [m for row in bundled[cursor : cursor + k] for m in row["messages"]]
        cursor += k
        if i % 3 == 0:
            messages = [{"role": "system", "content": "Answer with one number word."}, *messages]
        rows.append({"messages": messages, "source": "bundled tiny_chat (merged turns)", "row": i})
    return rows


def our_run(folder, examples, pad_id: int) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The loop's optimizer steps over `examples` in order; per step: loss, lr, pre-clip grad norm."""
    model = Mistral.from_pretrained(folder).train()
    optimizer = build_optimizer(model, SPEC)
    assert optimizer.defaults["eps"] == EPS
    scheduler = build_scheduler(optimizer, SPEC)
    objective = language_model(SPEC.loss_chunk_size)
    batches = [collate_padded(examples[i : i + BATCH], pad_id, SPEC.max_seq_len) for i in range(0, len(examples), BATCH)]
    log = []
    for step in range(STEPS):
        window = batches[step * ACCUM : (step + 1) * ACCUM]
        loss, n_tokens, _ = backward_window(model, objective, window, contextlib.nullcontext)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), SPEC.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        log.append({"loss": loss, "lr": lr, "grad_norm": float(grad_norm), "n_tokens": n_tokens})
    return log, {k: v.detach().clone() for k, v in model.state_dict().items()}


def trl_run(folder, tokenizer_dir, examples, output_dir) -> tuple[list[dict], dict[str, torch.Tensor], object]:
    """trl.SFTTrainer over the same ids and assistant masks, in order; its per-step logs, final weights, trainer."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    dataset = datasets.Dataset.from_dict({
        "input_ids": [list(e.input_ids) for e in examples],
        "assistant_masks": [[int(label != IGNORE_INDEX) for label in e.labels] for e in examples],
    })
    args = trl.SFTConfig(
        output_dir=str(output_dir), report_to=[], bf16=False, fp16=False, use_cpu=True, seed=0,
        max_steps=STEPS, per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
        train_sampling_strategy="sequential", dataloader_drop_last=False,
        learning_rate=SPEC.lr, optim="adamw_torch", adam_beta1=SPEC.beta1, adam_beta2=SPEC.beta2, adam_epsilon=EPS,
        weight_decay=SPEC.weight_decay, max_grad_norm=SPEC.grad_clip,
        lr_scheduler_type="cosine", warmup_steps=SPEC.warmup_steps,
        lr_scheduler_kwargs={"num_cycles": 0.5 * STEPS / (STEPS - 1)},  # zero at step T-1, as ours
        packing=False, padding_free=False, max_length=None, activation_checkpointing=False,
        logging_steps=1, save_strategy="no", disable_tqdm=True,
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    log = [entry for entry in trainer.state.log_history if "loss" in entry]
    return log, {k: v.detach().clone() for k, v in model.state_dict().items()}, trainer


def test_sft_steps_match_trl(tmp_path, hf_model, tiny):
    tokenizer = bundled("v1")
    examples, stats = tokenize_rows(chat_rows(N_EXAMPLES), tokenizer, SPEC.max_seq_len, train_on="assistant")
    assert len(examples) == N_EXAMPLES and stats.total().truncated == 0
    folder = tiny_folder(hf_model, tiny, tmp_path / "init")
    tokenizer_dir = with_tokenizer_model(tmp_path / "tokenizer")

    theirs, their_weights, trainer = trl_run(folder, tokenizer_dir, examples, tmp_path / "trl")
    ours, our_weights = our_run(folder, examples, pad_id=tokenizer.eos_id)

    # trl turned the mask into exactly our labels (EOS of every answer included), in our order.
    assert trainer.train_dataset["labels"] == [list(e.labels) for e in examples]
    assert len(theirs) == STEPS, f"trl logged {len(theirs)} training steps, expected {STEPS}"
    for step, (mine, ref) in enumerate(zip(ours, theirs)):
        assert ref["step"] == step + 1
        assert mine["lr"] == pytest.approx(ref["learning_rate"], rel=1e-9, abs=1e-15), f"lr at step {step + 1}"
        assert abs(mine["loss"] - ref["loss"]) < 1e-4, f"step {step + 1}: ours {mine['loss']:.6f}, trl {ref['loss']:.6f}"
        assert mine["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), f"grad norm at step {step + 1}"
    # Clipping was active, so it was compared too, and training moved the loss.
    assert max(r["grad_norm"] for r in theirs) > SPEC.grad_clip
    assert theirs[-1]["loss"] < theirs[0]["loss"] - 0.1
    # Final weights, loosely: Adam divides each coordinate's step by its own gradient scale, so a
    # coordinate whose gradient is at rounding-noise level can move by a different fraction of a
    # step (one step is at most lr = 3e-3; the weights move up to ~1.5e-2 in all).
    initial = Mistral.from_pretrained(folder).state_dict()
    weight_diff = max(float((our_weights[k] - their_weights[k]).abs().max()) for k in their_weights)
    moved = math.sqrt(sum(float((their_weights[k] - initial[k]).pow(2).sum()) for k in their_weights))
    apart = math.sqrt(sum(float((our_weights[k] - their_weights[k]).pow(2).sum()) for k in their_weights))
    print(f"final weights: max |ours - trl| {weight_diff:.2e}, ||ours - trl|| / ||trl - initial|| {apart / moved:.2e}; "
          f"max loss diff {max(abs(m['loss'] - r['loss']) for m, r in zip(ours, theirs)):.2e}")
    assert weight_diff < 1e-3 and apart / moved < 1e-3

    # The comparison is sharp: normalising each micro-batch by its own label count would miss step 1.
    model = Mistral.from_pretrained(folder)
    objective = language_model()
    window = [collate_padded(examples[i : i + BATCH], tokenizer.eos_id, SPEC.max_seq_len) for i in range(0, 2 * BATCH, BATCH)]
    counts = [objective.count(b) for b in window]
    assert counts[0] != counts[1]
    with torch.no_grad():
        per_batch = sum(float(objective.step(model, b)[0]) / n for b, n in zip(window, counts)) / ACCUM
    assert abs(per_batch - theirs[0]["loss"]) > 1e-3, "the examples do not tell the two normalisations apart"


def test_decayed_parameters_match_trainer(hf_model, tiny, tmp_path):
    """HF decays every weight but biases and norm scales (by name and module type); we decay
    every parameter of 2 or more dimensions. For Mistral the two sets are the same."""
    folder = tiny_folder(hf_model, tiny, tmp_path / "init")
    model = Mistral.from_pretrained(folder)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, SPEC.weight_decay)
    ours = {names[id(p)] for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == SPEC.weight_decay and groups[1]["weight_decay"] == 0.0
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    trainer = transformers.Trainer(model=hf, args=transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True))
    assert ours == set(trainer.get_decay_parameter_names(hf))
    assert {names[id(p)] for p in groups[1]["params"]} == {n for n, _ in hf.named_parameters()} - ours
    assert any("norm" in n for n in names.values() if n not in ours)


@pytest.mark.parametrize("steps,warmup", [(10, 3), (25, 5), (7, 1)])
def test_lr_schedule_pieces_match_transformers(steps, warmup):
    """Our warmup is transformers' "cosine_warmup_with_min_lr" warmup ((s+1)/w); our decay after
    it is transformers' "cosine" with num_cycles stretched so it reaches min_lr at the last step."""
    from transformers.optimization import get_scheduler

    spec = TrainerSpec(max_steps=steps, warmup_steps=warmup, min_lr_ratio=0.0)

    def hf_factors(name: str, **kwargs) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps,
                                  scheduler_specific_kwargs=kwargs)
        factors = []
        for _ in range(steps):
            factors.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return factors

    ours = [lr_factor(s, spec) for s in range(steps)]
    warm = hf_factors("cosine_warmup_with_min_lr", min_lr_rate=0.0)
    assert ours[:warmup] == pytest.approx(warm[:warmup], abs=1e-12)
    # transformers' cosine decays over (s - w) / (T - w); ours over (s - w) / (T - 1 - w)
    decay = hf_factors("cosine", num_cycles=0.5 * (steps - warmup) / (steps - 1 - warmup))
    assert ours[warmup:] == pytest.approx(decay[warmup:], abs=1e-12)
    assert ours[-1] == pytest.approx(0.0, abs=1e-12) and ours[warmup] == 1.0
    # and the difference is real: their plain cosine starts at lr 0 and never reaches 0
    plain = hf_factors("cosine")
    assert plain[0] == 0.0 and plain[-1] > 1e-3
    assert not math.isclose(plain[warmup + 1], ours[warmup + 1])
