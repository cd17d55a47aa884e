"""Our reward model equals `trl.RewardTrainer` 1.16 on a transformers `MistralForSequenceClassification`.

Both models carry the same order-one random weights (conftest's `make_pair`: our
`Mistral(MistralConfig(...), task="sequence_classification")` with num_labels=1 loads the transformers
model's state dict), and `config.pad_token_id` is the pad id used for collation. Both read the same
token ids: rows written in tests/oracle/_trl_helpers.py and bundled tiny_pairs rows, tokenized once
by our `tokenize_pairs` with the real v1 tokenizer; trl gets them as its pre-tokenized columns
`chosen_ids` / `rejected_ids` (prompt + answer, whole sequences) and `margin`, which its
`_prepare_dataset` accepts as they are.

How trl is driven: a real `RewardTrainer` on the transformers model; its `data_collator` batches the
dataset (checked equal to our `collate_pairs`), then `compute_loss(model, batch)` gives the loss and
logs accuracy, margin and mean reward; `train()` runs optimizer steps (sequential sampler, AdamW and
clipping as ours, constant lr). Our side: `reward_objective(RewardSpec(...)).step` on the padded batch
(a mean is its loss sum over its pairs), and for training the loop's `backward_window`, clip, step.

Pooling. The v1 tokenizer has no pad token, so both trl and our loop pad with EOS. Both models pool
the RIGHTMOST token whose id is not the pad id (transformers' rule, which ours copies), whatever the
attention mask says; every sequence ends with EOS, so with pad == EOS the score is read at the last
answer token, one before the EOS, on both sides alike. With a pad id other than EOS (here <unk>),
both read the EOS itself. `test_pooling_reads_the_same_token_on_both_sides` shows both cases.
"""

from __future__ import annotations

import contextlib

import pytest

trl = pytest.importorskip("trl")
import datasets  # noqa: E402
import torch  # noqa: E402

from mistral_train.config import RewardSpec, TrainerSpec  # noqa: E402
from mistral_train.data.preference import collate_pairs  # noqa: E402
from mistral_train.losses import reward_loss  # noqa: E402
from mistral_train.train.loop import backward_window  # noqa: E402
from mistral_train.train.optim import build_optimizer, build_scheduler  # noqa: E402
from mistral_train.train.steps import reward_objective  # noqa: E402
from tests.oracle._trl_helpers import TRL_ON_CPU, hf_tokenizer, pairs_of, preference_rows  # noqa: E402

N_PAIRS = 8
TOL = 1e-5


def model_kwargs(tiny, pad_id: int) -> dict:
    return tiny(vocab_size=32000, hidden_size=64, intermediate_size=128, num_labels=1, pad_token_id=pad_id)


def reward_trainer(hf, tokenizer, pairs, output_dir, margins: bool, **config) -> trl.RewardTrainer:
    rows = [{"chosen_ids": p.prompt_ids + p.chosen_ids, "rejected_ids": p.prompt_ids + p.rejected_ids,
             **({"margin": p.margin} if margins else {})} for p in pairs]
    args = trl.RewardConfig(output_dir=str(output_dir), max_length=None, activation_checkpointing=False, **TRL_ON_CPU,
                             **config)
    return trl.RewardTrainer(model=hf, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer)


def assert_same_batch(ours: dict, theirs: dict) -> None:
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert ours["attention_mask"].tolist() == theirs["attention_mask"].tolist()
    assert ("margin" in ours) == ("margin" in theirs)
    if "margin" in ours:
        assert ours["margin"].tolist() == theirs["margin"].tolist()


@pytest.mark.parametrize("coef", [None, 0.01], ids=["no_centring", "centring"])
@pytest.mark.parametrize("margins", [False, True], ids=["no_margin", "margin"])
def test_reward_loss_and_accuracy_match_trl_reward_trainer(margins, coef, tiny, hf_and_ours, tmp_path):
    """One padded batch of 8 pairs: loss, accuracy, mean reward, margin and every parameter's gradient."""
    tokenizer = hf_tokenizer(tmp_path / "tokenizer")
    pad_id = tokenizer.eos_token_id
    ours, hf = hf_and_ours(model_kwargs(tiny, pad_id), task="sequence_classification")
    pairs = pairs_of(preference_rows(N_PAIRS, margins=margins))
    trainer = reward_trainer(hf, tokenizer, pairs, tmp_path / "trl", margins, center_rewards_coefficient=coef)
    assert hf.config.pad_token_id == pad_id  # trl set it from the tokenizer: EOS
    theirs = trainer.data_collator(list(trainer.train_dataset))
    batch = collate_pairs(pairs, pad_id, packing=False, max_seq_len=256)
    assert_same_batch(batch, theirs)
    if margins:
        assert len(set(batch["margin"].tolist())) > 2  # per-pair margins, not one constant

    hf.train()
    want = trainer.compute_loss(hf, dict(theirs))
    want.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    ours.train()
    out = reward_objective(RewardSpec(center_rewards_coefficient=coef)).step(ours, batch)
    assert out.n_units == N_PAIRS
    loss = out.loss_sum / out.n_units  # the step returns the batch's mean loss times its pairs
    loss.backward()
    loss, want = float(loss.detach()), float(want.detach())
    stats = {k: float(v) / out.n_units for k, v in out.stats.items()}

    print(f"margin={margins} coef={coef}: loss ours {loss:.7f} trl {want:.7f}, "
          f"accuracy {stats['accuracy']:.3f}")
    assert abs(loss - want) < TOL
    assert stats["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-12)
    assert stats["rewards/chosen"] - stats["rewards/rejected"] == pytest.approx(metrics["margin"], abs=TOL)
    assert (stats["rewards/chosen"] + stats["rewards/rejected"]) / 2 == pytest.approx(metrics["mean_reward"], abs=TOL)
    hf_params = dict(hf.named_parameters())
    worst = 0.0
    for name, param in ours.named_parameters():
        theirs_grad = hf_params[name].grad
        torch.testing.assert_close(param.grad, theirs_grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
        worst = max(worst, float((param.grad - theirs_grad).abs().max()))
    print(f"  max gradient difference {worst:.2e}")

    # Sharp: the batch has right and wrong pairs, and the margin / centring term moved the loss.
    assert 0.0 < metrics["accuracy"] < 1.0
    with torch.no_grad():
        scores = ours(batch["input_ids"], attention_mask=batch["attention_mask"]).squeeze(-1)
    plain, _ = reward_loss(scores[:N_PAIRS], scores[N_PAIRS:])
    assert (abs(float(plain) - want) > 1e-3) == (margins or coef is not None)


@pytest.mark.parametrize("pad", ["eos", "unk"])
def test_pooling_reads_the_same_token_on_both_sides(pad, tiny, hf_and_ours, tmp_path):
    """pad == EOS (our default and trl's): both score the last answer token, one before the final EOS.
    pad == <unk>: both score the EOS. Either way trl's rewards equal ours, and the two choices differ."""
    tokenizer = hf_tokenizer(tmp_path / "tokenizer", pad_token="<unk>" if pad == "unk" else None)
    eos = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if pad == "unk" else eos
    ours, hf = hf_and_ours(model_kwargs(tiny, pad_id), task="sequence_classification")
    pairs = pairs_of(preference_rows(N_PAIRS))
    trainer = reward_trainer(hf, tokenizer, pairs, tmp_path / "trl", margins=False)
    assert hf.config.pad_token_id == pad_id and (pad_id == eos) == (pad == "eos")
    batch = collate_pairs(pairs, pad_id, packing=False, max_seq_len=256)
    assert_same_batch(batch, trainer.data_collator(list(trainer.train_dataset)))
    lengths = batch["attention_mask"].sum(1)  # (2B,)
    rows = torch.arange(len(lengths))
    assert (batch["input_ids"][rows, lengths - 1] == eos).all()  # every sequence ends with its EOS

    with torch.no_grad():
        trl_scores = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   use_cache=False).logits.squeeze(-1)
        scores = ours(batch["input_ids"], attention_mask=batch["attention_mask"]).squeeze(-1)
        hidden = ours(batch["input_ids"], attention_mask=batch["attention_mask"], return_hidden=True)
        at_eos = ours.score(hidden[rows, lengths - 1]).squeeze(-1)
        before_eos = ours.score(hidden[rows, lengths - 2]).squeeze(-1)
    torch.testing.assert_close(scores, trl_scores, rtol=0, atol=TOL)
    read = before_eos if pad == "eos" else at_eos
    torch.testing.assert_close(scores, read, rtol=0, atol=1e-6)
    assert float((at_eos - before_eos).abs().min()) > 1e-3  # the two tokens give different rewards


def test_reward_steps_match_trl_reward_trainer(tiny, hf_and_ours, tmp_path):
    """3 optimizer steps (2 micro-batches of 2 pairs each, margins and centring on, clipping, constant
    lr): per-step loss, grad norm, accuracy, margin and mean reward equal trl's `RewardTrainer.train()`."""
    steps, batch_size, accum = 3, 2, 2
    spec = TrainerSpec(objective="reward", max_steps=steps, max_seq_len=256, batch_size=batch_size,
                       grad_accum_steps=accum, lr=2e-3, min_lr_ratio=1.0, warmup_steps=0, weight_decay=0.1,
                       beta1=0.9, beta2=0.95, grad_clip=1.0, device="cpu")
    coef = 0.01
    tokenizer = hf_tokenizer(tmp_path / "tokenizer")
    pad_id = tokenizer.eos_token_id
    ours, hf = hf_and_ours(model_kwargs(tiny, pad_id), task="sequence_classification")
    pairs = pairs_of(preference_rows(steps * batch_size * accum, margins=True))
    trainer = reward_trainer(
        hf, tokenizer, pairs, tmp_path / "trl", True, center_rewards_coefficient=coef, max_steps=steps,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=accum,
        train_sampling_strategy="sequential", dataloader_drop_last=False, learning_rate=spec.lr,
        optim="adamw_torch", adam_beta1=spec.beta1, adam_beta2=spec.beta2, adam_epsilon=1e-8,
        weight_decay=spec.weight_decay, max_grad_norm=spec.grad_clip, lr_scheduler_type="constant",
        warmup_steps=0, logging_steps=1)
    trainer.train()
    theirs = [entry for entry in trainer.state.log_history if "loss" in entry]

    ours.train()
    objective = reward_objective(RewardSpec(center_rewards_coefficient=coef))
    optimizer = build_optimizer(ours, spec)
    scheduler = build_scheduler(optimizer, spec)
    batches = [collate_pairs(pairs[i : i + batch_size], pad_id, False, spec.max_seq_len)
               for i in range(0, len(pairs), batch_size)]
    assert len(theirs) == steps
    worst = 0.0
    for step in range(steps):
        loss, _, stats = backward_window(ours, objective, batches[step * accum : (step + 1) * accum],
                                         contextlib.nullcontext)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(ours.parameters(), spec.grad_clip))
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        ref, where = theirs[step], f"step {step + 1}"
        assert lr == pytest.approx(ref["learning_rate"], rel=1e-9), where
        assert grad_norm == pytest.approx(ref["grad_norm"], rel=1e-4), where
        assert stats["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12), where
        diffs = {"loss": abs(loss - ref["loss"]),
                 "margin": abs(stats["rewards/chosen"] - stats["rewards/rejected"] - ref["margin"]),
                 "mean_reward": abs((stats["rewards/chosen"] + stats["rewards/rejected"]) / 2 - ref["mean_reward"])}
        worst = max(worst, *diffs.values())
        assert max(diffs.values()) < 1e-4, f"{where}: {diffs}"
    print(f"reward model, {steps} steps: max |ours - trl| {worst:.2e}; losses {[r['loss'] for r in theirs]}")
    assert max(r["grad_norm"] for r in theirs) > spec.grad_clip  # clipping was active
    assert abs(theirs[-1]["loss"] - theirs[0]["loss"]) > 1e-2  # and the model moved
