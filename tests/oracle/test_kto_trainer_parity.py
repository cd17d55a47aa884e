"""Our KTO through fit() equals `trl.KTOTrainer` 1.16, step for step, and ends at the same weights.

One tiny transformers Mistral (order-one random weights, the real 32000-token vocabulary, no dropout) is
saved to a folder with the real v1 tokenizer; trl trains it with transformers, we train it with fit()
(trainer.objective=kto) from the same folder and the same unpaired rows.

How the two sides are made to read the same examples in the same order:
- Token ids: trl 1.16's KTOTrainer tokenizes conversational rows with the transformers chat template,
  which the v1 tokenizer folder does not carry. Its module-level `_tokenize` is replaced, for this test
  only, by a lookup of OUR encoding (data/unpaired.py `tokenize_unpaired`, the v1 template as
  mistral-common encodes it): the prompt alone -> our prompt ids, prompt + completion -> our whole
  sequence. Everything else in its data preparation is trl's own: the prefix split, and the mismatched
  KL completions (`add_kl_completion_ids`: each batch of `per_device_train_batch_size` rows rotated by
  one), which is what this test checks our batches against.
- Order: fit() visits the rows in `epoch_order(n, seed, 0)`; trl reads them sequentially (KTO's default,
  `train_sampling_strategy="sequential"`), so trl is given the rows in that order.
- Optimisation: AdamW (torch's, our betas/eps), no weight decay, clipping at 1.0, a constant learning
  rate, 2 micro-batches of 3 examples per step, frozen-copy reference (`ref_model=` a second load).
Every micro-batch holds a desirable and an undesirable example, so the class metrics trl averages over
micro-batches are defined in each (train/kto_step.py says what differs otherwise).
"""

from __future__ import annotations

import json

import pytest

trl = pytest.importorskip("trl")
import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from mistral_train.config import (DataSpec, KTOSpec, ModelSpec, RunConfig, RunSpec, TrackingSpec,  # noqa: E402
                                  TrainerSpec)
from mistral_train.data.formats import to_canonical  # noqa: E402
from mistral_train.data.packing import epoch_order  # noqa: E402
from mistral_train.data.unpaired import tokenize_unpaired  # noqa: E402
from mistral_train.train import fit  # noqa: E402
from tests._chat import A, S, U  # noqa: E402
from tests._tokenizers import with_tokenizer_model  # noqa: E402
from tests.oracle._trl_helpers import TRL_ON_CPU, hf_tokenizer, our_tokenizer, tiny_folder  # noqa: E402

BATCH, ACCUM, STEPS, SEED = 3, 2, 3, 0  # 3 per batch: rotating by +1 and by -1 differ
LR, CLIP, CHUNK = 2e-3, 1.0, 7  # loss_chunk_size 7 divides no completion: the chunk seams are exercised
METRICS = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")
TOL = 1e-4

# Completions of 1 to ~20 tokens, string and conversational rows, a system turn and a multi-turn history.
DESIRABLE = [
    {"prompt": "What is two plus two?", "completion": "Four."},
    {"prompt": [S("You are terse."), U("Name a colour of the sky on a clear day.")], "completion": [A("Blue.")]},
    {"prompt": "Hi", "completion": "Hello! How can I help you today?"},
    {"prompt": [U("Name a fruit."), A("An apple."), U("And a vegetable?")], "completion": [A("A carrot.")]},
    {"prompt": "Spell 'cat' backwards.", "completion": "tac"},
    {"prompt": "Is the Earth flat?", "completion": "No, it is very nearly a sphere."},
    {"prompt": "What do cows drink?", "completion": "Water."},
    {"prompt": [U("Say hello in French.")], "completion": [A("Bonjour!")]},
    {"prompt": "How many legs has a spider?", "completion": "Eight legs, like every other spider."},
]
UNDESIRABLE = [
    {"prompt": "What is ten minus three?", "completion": "It is five, I think, or maybe six."},
    {"prompt": [U("Which animal says meow?")], "completion": [A("A cow.")]},
    {"prompt": "Name a planet.", "completion": "Go away."},
    {"prompt": "What colour is grass?", "completion": "Purple, like most grass in the world is, of course."},
    {"prompt": [S("Answer in one word."), U("What is the capital of France?")], "completion": [A("London")]},
    {"prompt": "Count to three.", "completion": "one two four"},
    {"prompt": "What is the opposite of hot?", "completion": "Hot."},
    {"prompt": [U("Is ice cold?")], "completion": [A("No, ice is usually quite warm to the touch.")]},
    {"prompt": "Name a bird.", "completion": "A dog"},
]


def file_rows() -> list[dict]:
    """18 rows in file order, arranged so that each micro-batch of fit()'s order holds both labels."""
    n = STEPS * BATCH * ACCUM
    order = epoch_order(n, SEED, 0)  # fit()'s first epoch visits file row order[k] k-th
    rows: list = [None] * n
    good, bad = iter(DESIRABLE), iter(UNDESIRABLE)
    for k, index in enumerate(order):  # position k of the visit: even desirable, odd undesirable
        rows[index] = {**(next(good) if k % 2 == 0 else next(bad)), "label": k % 2 == 0}
    return rows


def canonical(rows: list[dict]) -> list[dict]:
    return [{**to_canonical(r, "unpaired", {}, f"kto.jsonl line {i + 1}"), "source": "kto.jsonl", "row": i + 1}
            for i, r in enumerate(rows)]


def key(messages) -> str:
    return json.dumps([[m["role"], m["content"]] for m in messages])


def our_ids(rows: list[dict]) -> dict[str, list[int]]:
    """Our encoding, looked up by the messages trl tokenizes: prompt alone, and prompt + completion."""
    examples, stats = tokenize_unpaired(canonical(rows), our_tokenizer(), 256)
    assert len(examples) == len(rows) and stats.truncated == 0
    table = {}
    for row, ex in zip(canonical(rows), examples):
        table[key(row["prompt"])] = ex.prompt_ids
        table[key(row["prompt"] + row["completion"])] = ex.prompt_ids + ex.completion_ids
    return table


def trl_run(folder, tokenizer, rows, output_dir, monkeypatch, kto: KTOSpec) -> tuple[list[dict], dict]:
    """trl's per-step logs and final weights over `rows` in fit()'s visiting order."""
    table = our_ids(rows)
    monkeypatch.setattr(trl.trainer.kto_trainer, "_tokenize",
                        lambda _tok, messages, **_: {"input_ids": list(table[key(messages)])})
    order = epoch_order(len(rows), SEED, 0)
    dataset = datasets.Dataset.from_list([{k: v for k, v in r.items() if k in ("prompt", "completion", "label")}
                                          for r in (canonical(rows)[i] for i in order)])
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,  # noqa: E731
                                                                     attn_implementation="sdpa")
    args = trl.KTOConfig(
        output_dir=str(output_dir), max_length=None, max_steps=STEPS, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM, train_sampling_strategy="sequential", learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.95,
        adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=CLIP, logging_steps=1, loss_type=kto.loss_type,
        beta=kto.beta, desirable_weight=kto.desirable_weight, undesirable_weight=kto.undesirable_weight,
        **TRL_ON_CPU)
    trainer = trl.KTOTrainer(model=load(), ref_model=load(), args=args, train_dataset=dataset,
                             processing_class=tokenizer)
    # its KL completions are its own rotation of each batch's completions (what our batches are checked against)
    if kto.loss_type == "kto":
        prepared = trainer.train_dataset
        for start in range(0, len(prepared), BATCH):
            block = prepared[start : start + BATCH]
            assert block["KL_completion_ids"] == [block["completion_ids"][-1]] + block["completion_ids"][:-1]
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return logs, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def our_run(tmp_path, folder, rows, name: str, kto: KTOSpec, packing: bool):
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = TrainerSpec(objective="kto", max_steps=STEPS, max_seq_len=256, batch_size=BATCH,
                          grad_accum_steps=ACCUM, lr=LR, min_lr_ratio=1.0, warmup_steps=0, weight_decay=0.0,
                          beta1=0.9, beta2=0.95, grad_clip=CLIP, loss_chunk_size=CHUNK, device="cpu", seed=SEED,
                          log_every=1, eval_max_new_tokens=0, sample_max_new_tokens=1, kto=kto)
    cfg = RunConfig(model=ModelSpec(path=str(folder)),
                    data=DataSpec(path=str(path), format="unpaired", packing=packing),
                    trainer=trainer, run=RunSpec(name=name, dir=str(tmp_path / "runs")),
                    tracking=TrackingSpec(progress_bar=False, plot=False))
    run_dir = fit(cfg)
    logs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in logs if "loss" in r], load_file(run_dir / "final" / "model.safetensors")


def compare(ours: list[dict], theirs: list[dict], our_weights: dict, their_weights: dict, what: str) -> float:
    assert len(ours) == len(theirs) == STEPS, f"{what}: {len(ours)} and {len(theirs)} logged steps"
    worst = 0.0
    for step, (mine, ref) in enumerate(zip(ours, theirs)):
        where = f"{what}, step {step + 1}"
        assert mine["lr"] == pytest.approx(ref["learning_rate"], rel=1e-9), where
        assert mine["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), f"{where}: grad norm"
        for name in ("loss", *METRICS):
            if name == "kl" and name not in ref:
                continue
            diff = abs(mine[name] - ref[name])
            worst = max(worst, diff)
            assert diff < TOL, f"{where}: {name} ours {mine[name]:.6f}, trl {ref[name]:.6f}"
    shared = [k for k in our_weights if k in their_weights]
    assert len(shared) >= len(their_weights) - 1  # lm_head may be tied to the embeddings on one side only
    for name in shared:
        torch.testing.assert_close(our_weights[name], their_weights[name], rtol=0, atol=TOL,
                                   msg=lambda m: f"{what}: {name}: {m}")
    return worst


@pytest.fixture
def folder(tmp_path, hf_model, tiny):
    saved = tiny_folder(hf_model, tiny, tmp_path / "init")
    with_tokenizer_model(saved)  # our fit() reads the v1 tokenizer from the folder
    return saved


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_kto_steps_and_weights_match_trl_kto_trainer(tmp_path, folder, monkeypatch, packing):
    """3 KTO steps (beta 0.1, equal weights): per-step loss, grad norm, KL estimate and the reward/log-prob
    metrics, and the final weights, equal trl's."""
    kto = KTOSpec(loss_type="kto", beta=0.1, reference="copy")
    rows = file_rows()
    theirs, their_weights = trl_run(folder, hf_tokenizer(tmp_path / "tok"), rows, tmp_path / "trl", monkeypatch, kto)
    ours, our_weights = our_run(tmp_path, folder, rows, "ours", kto, packing)
    worst = compare(ours, theirs, our_weights, their_weights, "kto")
    print(f"kto, 3 steps: max |ours - trl| {worst:.2e}; losses {[round(r['loss'], 6) for r in theirs]}, "
          f"kl {[round(r['kl'], 6) for r in theirs]}")
    # sharp: step 1 is policy == reference (loss 0.5 per example, KL 0); later the KL estimate moved off 0
    assert theirs[0]["loss"] == pytest.approx(0.5, abs=1e-6) and theirs[0]["kl"] == 0.0
    assert max(r["kl"] for r in theirs[1:]) > 1e-4 or max(abs(r["rewards/margins"]) for r in theirs[1:]) > 1e-3
    assert max(r["grad_norm"] for r in theirs) > 0


@pytest.mark.parametrize("kto", [KTOSpec(loss_type="apo_zero_unpaired", beta=0.2, reference="copy"),
                                 KTOSpec(loss_type="kto", beta=0.1, desirable_weight=2.0, undesirable_weight=0.5,
                                         reference="copy")], ids=["apo_zero_unpaired", "weighted"])
def test_apo_zero_and_class_weights_match_trl_kto_trainer(tmp_path, folder, monkeypatch, kto):
    """apo_zero_unpaired (no KL pass at all) and desirable_weight != undesirable_weight: steps and weights
    equal trl's."""
    rows = file_rows()
    theirs, their_weights = trl_run(folder, hf_tokenizer(tmp_path / "tok"), rows, tmp_path / "trl", monkeypatch, kto)
    ours, our_weights = our_run(tmp_path, folder, rows, "ours", kto, packing=False)
    worst = compare(ours, theirs, our_weights, their_weights, kto.loss_type)
    print(f"{kto.loss_type} weights {kto.desirable_weight}/{kto.undesirable_weight}: max |ours - trl| {worst:.2e}; "
          f"losses {[round(r['loss'], 6) for r in theirs]}")
    # step 1 (policy == reference): kto 0.5 per example times its weight; apo_zero 1 - sigmoid(0) = sigmoid(0) = 0.5
    want = 0.5 if kto.loss_type == "apo_zero_unpaired" else 0.5 * (kto.desirable_weight + kto.undesirable_weight) / 2
    assert theirs[0]["loss"] == pytest.approx(want, abs=1e-6)
