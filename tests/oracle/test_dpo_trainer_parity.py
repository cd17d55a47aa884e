"""Our DPO equals `trl.DPOTrainer` 1.16: per-sequence log-probs, and optimizer steps with their metrics.

One tiny transformers Mistral (order-one random weights, the real 32000-token vocabulary) is saved to
a folder; trl loads it with transformers, we load it with `Mistral.from_pretrained`. Both read the
same token ids: rows written here and bundled tiny_pairs rows, tokenized once by our `tokenize_pairs`
with the real v1 tokenizer (tests/oracle/_trl_helpers.py).

How trl is driven: trl 1.16's `DPOTrainer.__init__` always runs its own data preparation (prompt
extraction, then tokenization), so a dataset that already holds `prompt_ids`/`chosen_ids`/
`rejected_ids` fails there (KeyError 'chosen'). The trainer is therefore built on a one-row text
dataset, and its `train_dataset` is then replaced by the pre-tokenized one (those three columns are
what its collator and signature columns read). Everything after that is trl's own code:
- log-probs: `trainer.compute_ref_log_probs(trainer.model, batch)` on its collated batch, i.e. its
  concatenated forward (chosen rows, then rejected) through the fused LM head (`fused_lm_head=True`),
  summed over the completion mask: the same code path `_compute_loss` takes for the policy, which is
  also run once to compare its logged `logps/*` means;
- training: `trainer.train()` with a frozen reference model (`ref_model=`: a second load of the
  starting folder), a sequential sampler, AdamW with our betas/eps/decay, our clipping, and the
  schedule matched to ours (cosine with `num_cycles = 0.5 T / (T - 1)`, which reaches 0 at the last
  step as ours does, see test_sft_trl_parity; or constant). Its `log_history` gives per step the loss,
  grad norm, learning rate and the reward metrics, each averaged over the window's micro-batches.
Our side runs what `fit()` runs for `trainer.objective=dpo`: `build_reference("copy")`,
`dpo_objective`, `backward_window`, clip, `optimizer.step`, `zero_grad`, `scheduler.step`. Our metrics
are sums over the window's pairs divided by its pairs; with micro-batches of equal size that is trl's
mean of micro-batch means.
"""

from __future__ import annotations

import contextlib
import math

import pytest

trl = pytest.importorskip("trl")
import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from mistral_train import Mistral  # noqa: E402
from mistral_train.config import DPOSpec, TrainerSpec  # noqa: E402
from mistral_train.data.preference import collate_pairs  # noqa: E402
from mistral_train.losses import dpo_loss  # noqa: E402
from mistral_train.train.loop import backward_window  # noqa: E402
from mistral_train.train.optim import build_optimizer, build_scheduler  # noqa: E402
from mistral_train.train.reference import build_reference  # noqa: E402
from mistral_train.train.steps import dpo_objective, sequence_logprobs  # noqa: E402
from tests.oracle._trl_helpers import TRL_ON_CPU, hf_tokenizer, pairs_of, preference_rows, tiny_folder  # noqa: E402

CHUNK = 7  # loss_chunk_size: divides no sequence's completion count, so the chunk seams are exercised
BATCH, ACCUM = 2, 2  # pairs per micro-batch, micro-batches per step
EPS = 1e-8  # torch's AdamW default, which build_optimizer keeps
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")
TOL = 1e-4  # per-step loss and metrics (fp32; they drift apart by ~1e-5 over the steps)


def trainer_spec(steps: int, constant: bool) -> TrainerSpec:
    return TrainerSpec(objective="dpo", max_steps=steps, max_seq_len=256, batch_size=BATCH, grad_accum_steps=ACCUM,
                       lr=2e-3, min_lr_ratio=1.0 if constant else 0.0, warmup_steps=0, weight_decay=0.1,
                       beta1=0.9, beta2=0.95, grad_clip=1.0, loss_chunk_size=CHUNK, device="cpu")


def dpo_trainer(folder, tokenizer, pairs, output_dir, **config) -> trl.DPOTrainer:
    """A real DPOTrainer on the saved model, reading exactly our pairs' ids (see the module docstring)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    args = trl.DPOConfig(output_dir=str(output_dir), max_length=None, activation_checkpointing=False, **TRL_ON_CPU,
                         **config)
    placeholder = datasets.Dataset.from_list([{"prompt": "x", "chosen": "y", "rejected": "z"}])
    trainer = trl.DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=placeholder,
                             processing_class=tokenizer)
    trainer.train_dataset = datasets.Dataset.from_list(
        [{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids} for p in pairs])
    return trainer


def trl_run(folder, tokenizer, pairs, output_dir, spec: TrainerSpec, dpo: DPOSpec) -> list[dict]:
    """trl's per-step logs of `spec.max_steps` DPO steps over `pairs` in order."""
    steps = spec.max_steps
    schedule = dict(lr_scheduler_type="constant") if spec.min_lr_ratio == 1.0 else dict(
        lr_scheduler_type="cosine", lr_scheduler_kwargs={"num_cycles": 0.5 * steps / (steps - 1)})
    trainer = dpo_trainer(
        folder, tokenizer, pairs, output_dir, max_steps=steps, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM, train_sampling_strategy="sequential", dataloader_drop_last=False,
        learning_rate=spec.lr, optim="adamw_torch", adam_beta1=spec.beta1, adam_beta2=spec.beta2, adam_epsilon=EPS,
        weight_decay=spec.weight_decay, max_grad_norm=spec.grad_clip, warmup_steps=spec.warmup_steps,
        beta=dpo.beta, loss_type=[dpo.loss_type], logging_steps=1, **schedule)
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def our_run(folder, pairs, pad_id: int, packing: bool, spec: TrainerSpec, dpo: DPOSpec, probe=None) -> list[dict]:
    """fit()'s DPO steps over `pairs` in order; per step: loss, lr, pre-clip grad norm and the metrics.
    `probe(model, reference, window)`, if given, runs before each step's backward."""
    model = Mistral.from_pretrained(folder).train()
    reference = build_reference("copy", model, spec.loss_chunk_size)  # before any update, as fit() builds it
    objective = dpo_objective(dpo, reference, spec.loss_chunk_size)
    optimizer = build_optimizer(model, spec)
    assert optimizer.defaults["eps"] == EPS
    scheduler = build_scheduler(optimizer, spec)
    batches = [collate_pairs(pairs[i : i + BATCH], pad_id, packing, spec.max_seq_len)
               for i in range(0, len(pairs), BATCH)]
    log = []
    for step in range(spec.max_steps):
        window = batches[step * ACCUM : (step + 1) * ACCUM]
        if probe is not None:
            probe(model, reference, window)
        loss, units, stats = backward_window(model, objective, window, contextlib.nullcontext)
        assert units == BATCH * ACCUM
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        log.append({"loss": loss, "lr": lr, "grad_norm": float(grad_norm), **stats})
    return log


def compare_steps(ours: list[dict], theirs: list[dict], what: str) -> float:
    """Assert step-by-step agreement; return the largest loss/metric difference."""
    assert len(theirs) == len(ours), f"trl logged {len(theirs)} training steps, expected {len(ours)}"
    worst = 0.0
    for step, (mine, ref) in enumerate(zip(ours, theirs)):
        where = f"{what}, step {step + 1}"
        assert ref["step"] == step + 1
        assert mine["lr"] == pytest.approx(ref["learning_rate"], rel=1e-9, abs=1e-15), f"{where}: lr"
        assert mine["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), f"{where}: grad norm"
        for key in ("loss", *METRICS):
            diff = abs(mine[key] - ref[key])
            worst = max(worst, diff)
            assert diff < TOL, f"{where}: {key} ours {mine[key]:.6f}, trl {ref[key]:.6f}"
    return worst


@pytest.fixture
def setup(tmp_path, hf_model, tiny):
    """(saved tiny model folder, trl's tokenizer, our pad id)."""
    folder = tiny_folder(hf_model, tiny, tmp_path / "init")
    tokenizer = hf_tokenizer(tmp_path / "tokenizer")
    return folder, tokenizer, tokenizer.eos_token_id


def test_sequence_logprobs_match_trl_concatenated_forward(setup, tmp_path):
    """`sequence_logprobs` on a padded and on a packed `collate_pairs` batch gives, per sequence, trl's
    summed completion log-probs of its concatenated forward (and its completion token counts)."""
    folder, tokenizer, pad_id = setup
    pairs = pairs_of(preference_rows(8))
    trainer = dpo_trainer(folder, tokenizer, pairs, tmp_path / "trl")
    batch = trainer.data_collator(list(trainer.train_dataset))  # 2B rows: the B chosen, then the B rejected
    with torch.no_grad():
        trl_chosen, trl_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    want = torch.cat([trl_chosen, trl_rejected])  # (2B,)
    want_counts = batch["completion_mask"][:, 1:].sum(1)  # trl scores tokens 1.. (the shifted mask)

    model = Mistral.from_pretrained(folder).eval()
    padded = collate_pairs(pairs, pad_id, packing=False, max_seq_len=256)
    # the same batch: trl's collator and ours agree token for token
    assert padded["input_ids"].tolist() == batch["input_ids"].tolist()
    assert padded["attention_mask"].tolist() == batch["attention_mask"].tolist()
    assert (padded["labels"] != -100).long().tolist() == batch["completion_mask"].tolist()
    packed = collate_pairs(pairs, pad_id, packing=True, max_seq_len=64)
    assert packed["input_ids"].shape[0] < 2 * len(pairs) and "attention_mask" not in packed  # rows of several sequences
    worst = {}
    for name, ours_batch in (("padded", padded), ("packed", packed)):
        with torch.no_grad():
            logps, counts = sequence_logprobs(model, ours_batch, CHUNK)
        assert counts.tolist() == want_counts.tolist(), name
        diff = (logps - want).abs()
        worst[name] = float(diff.max())
        # sums of up to ~20 log-probs of size ~10: 1e-5 per token, ~1e-7 relative (fp32 rounding)
        assert float((diff / counts).max()) < 1e-5, f"{name}: per-token difference {diff / counts}"
        torch.testing.assert_close(logps, want, rtol=1e-6, atol=1e-5, msg=lambda m: f"{name}: {m}")
    print(f"log-probs: max |ours - trl| {worst}; values {want.min():.1f}..{want.max():.1f}")

    # the policy path of trl's loss (`_compute_loss`) logs the same log-probs, as batch means
    trainer.model.train()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
    metrics = trainer._metrics["train"]
    B = len(pairs)
    assert metrics["logps/chosen"][-1] == pytest.approx(float(want[:B].mean()), abs=1e-5)
    assert metrics["logps/rejected"][-1] == pytest.approx(float(want[B:].mean()), abs=1e-5)
    # and the comparison is sharp: the lengths differ within pairs and the values are far from equal
    assert (want_counts[:B] != want_counts[B:]).any() and float((want[:B] - want[B:]).abs().max()) > 1.0


def test_dpo_steps_match_trl_dpo_trainer(setup, tmp_path):
    """5 sigmoid-DPO steps (beta 0.1, cosine schedule, clipping, 2 micro-batches of 2 pairs per step) from a
    frozen-copy reference: per-step loss, lr, grad norm and the six reward/log-prob metrics equal trl's, for
    our padded and our packed batches alike."""
    folder, tokenizer, pad_id = setup
    spec, dpo = trainer_spec(steps=5, constant=False), DPOSpec(loss_type="sigmoid", beta=0.1, reference="copy")
    pairs = pairs_of(preference_rows(spec.max_steps * BATCH * ACCUM))
    theirs = trl_run(folder, tokenizer, pairs, tmp_path / "trl", spec, dpo)
    worst = {}
    for packing in (False, True):
        ours = our_run(folder, pairs, pad_id, packing, spec, dpo)
        worst["packed" if packing else "padded"] = compare_steps(ours, theirs, "packed" if packing else "padded")
    print(f"sigmoid DPO, 5 steps: max |ours - trl| over loss and metrics {worst}")
    # The comparison covers what it claims: step 1 is ln 2 with zero rewards (policy == reference), later
    # steps moved the policy both ways, and clipping was active.
    assert theirs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and theirs[0]["rewards/margins"] == 0.0
    assert max(abs(r["rewards/margins"]) for r in theirs[1:]) > 0.05
    assert {r["rewards/accuracies"] for r in theirs[1:]} - {0.0, 1.0}
    assert max(r["grad_norm"] for r in theirs) > spec.grad_clip


def test_ipo_steps_match_trl_dpo_trainer(setup, tmp_path):
    """3 IPO steps (beta 0.5, constant lr): trl divides each log-ratio by its completion length, and so
    do we. Step 1 is (1 / (2 beta))^2 = 1 whatever the lengths; steps 2 and 3 test the normalisation,
    and an unnormalised IPO is shown to miss step 2."""
    folder, tokenizer, pad_id = setup
    spec, dpo = trainer_spec(steps=3, constant=True), DPOSpec(loss_type="ipo", beta=0.5, reference="copy")
    pairs = pairs_of(preference_rows(spec.max_steps * BATCH * ACCUM))
    theirs = trl_run(folder, tokenizer, pairs, tmp_path / "trl", spec, dpo)
    unnormalised = []

    def probe(model, reference, window):  # IPO on summed log-ratios (lengths 1) for this window
        with torch.no_grad():
            losses = []
            for batch in window:
                B = BATCH
                logps, _ = sequence_logprobs(model, batch, CHUNK)
                ref = reference(model, batch)
                losses.append(dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], "ipo", beta=dpo.beta,
                                       chosen_lengths=torch.ones(B), rejected_lengths=torch.ones(B))[0])
        unnormalised.append(float(torch.cat(losses).mean()))

    ours = our_run(folder, pairs, pad_id, False, spec, dpo, probe=probe)
    worst = compare_steps(ours, theirs, "ipo")
    print(f"IPO, 3 steps: max |ours - trl| over loss and metrics {worst:.2e}; losses {[r['loss'] for r in theirs]}")
    assert theirs[0]["loss"] == pytest.approx(1.0, abs=1e-6)
    assert abs(unnormalised[1] - theirs[1]["loss"]) > 10 * TOL, "the pairs do not tell normalised IPO apart"
