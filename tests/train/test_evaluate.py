"""Held-out evaluation: token-weighted loss, and greedy exact match on rows with an answer."""

import math

import pytest
import torch
import torch.nn.functional as F

from mistral_train.config import DataSpec
from mistral_train.data.sources import load_rows
from tests._tokenizers import bundled
from mistral_train.train import evaluate
from mistral_train.train.evaluate import evaluate_loss, exact_match, normalize_answer
from mistral_train.train.steps import pretrain_step


@pytest.fixture(scope="module")
def tokenizer():
    return bundled("v1")


def _batches(vocab: int) -> list[dict]:
    """Three batches whose label-token counts differ a lot (3, 2*14 and 4*19 labels after the shift)."""
    g = torch.Generator().manual_seed(3)
    out = []
    for rows, length, masked in ((1, 16, 12), (2, 16, 1), (4, 20, 0)):
        ids = torch.randint(3, vocab, (rows, length), generator=g)
        labels = ids.clone()
        labels[:, :masked] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_eval_loss_is_token_weighted_and_restores_training_mode(our_model, tiny):
    model = our_model(tiny())
    batches = _batches(model.config.vocab_size)
    with torch.no_grad():  # by hand: every label token of every batch counts once
        losses = [F.cross_entropy(model(b["input_ids"])[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(),
                                  ignore_index=-100, reduction="none") for b in batches]
    kept = [loss[b["labels"][:, 1:].flatten() != -100] for loss, b in zip(losses, batches)]
    expected = float(torch.cat(kept).mean())
    mean_of_means = sum(float(k.mean()) for k in kept) / len(kept)
    assert abs(expected - mean_of_means) > 1e-3  # the two averages really differ here

    seen = []

    def step(m, batch):
        seen.append((m.training, torch.is_grad_enabled()))
        return pretrain_step(m, batch, loss_chunk_size=5)

    model.train()
    result = evaluate_loss(model, step, batches)
    assert result["eval_loss"] == pytest.approx(expected, abs=1e-5)
    assert result["eval_ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert seen == [(False, False)] * 3  # eval mode, no graph
    assert model.training
    model.eval()
    evaluate_loss(model, step, batches)
    assert not model.training  # restored, not forced to train


def test_eval_loss_reduces_over_processes_and_needs_labels(our_model, tiny):
    model = our_model(tiny())
    batches = _batches(model.config.vocab_size)
    alone = evaluate_loss(model, pretrain_step, batches)["eval_loss"]
    # as if a second process had the same loss sum but twice the tokens
    doubled = evaluate_loss(model, pretrain_step, batches, reduce_sum=lambda t: t * torch.tensor([1.0, 2.0], dtype=t.dtype))
    assert doubled["eval_loss"] == pytest.approx(alone / 2)
    empty = [{"input_ids": batches[0]["input_ids"], "labels": torch.full_like(batches[0]["labels"], -100)}]
    with pytest.raises(ValueError, match="no label tokens"):
        evaluate_loss(model, pretrain_step, empty)


@pytest.mark.parametrize("prediction, answer, same", [
    ("  Sunday. ", "Sunday", True), ("ELEVEN", "eleven", True), ("brown!", "brown", True),
    ("blue\n\n  sky", "Blue sky", True), ("3.5", "3.5", True), ("3.5", "35", False),
    ("the brown", "brown", False), ("brown cow", "brown", False), ("", "brown", False),
])
def test_normalisation(prediction, answer, same):
    assert (normalize_answer(prediction) == normalize_answer(answer)) is same


def _row(question, answer, row, history=()):
    messages = [*history, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "answer": answer, "source": "eval.jsonl", "row": row}


def test_exact_match_scores_normalised_replies_of_left_padded_batches(tokenizer, monkeypatch):
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there, who are you?"},
               {"role": "assistant", "content": "A helper."}]
    rows = [_row("Which colour is the ball?", "brown", 1), _row("Day after Saturday?", "Sunday", 2, history),
            _row("Twenty minus nine?", "eleven", 3), _row("Capital of France?", "Paris", 4),
            _row("Two plus two?", "four", 5)]
    replies = {"ball": "  Brown. ", "Saturday": "SUNDAY", "nine": "ten", "France": "Paris!", "two": "four"}
    junk = tokenizer.encode("after the end")
    expected_prompts = [tokenizer.apply_chat_template(r["messages"][:-1], add_generation_prompt=True) for r in rows]
    seen = []

    def fake_generate(model, ids, max_new_tokens, attention_mask=None, eos_token_id=None, **_):
        assert eos_token_id == tokenizer.eos_id and max_new_tokens == 16
        outs = []
        for row_ids, row_mask in zip(ids.tolist(), attention_mask.tolist()):
            assert row_mask == sorted(row_mask) and row_mask[-1] == 1  # left padding
            prompt = [i for i, keep in zip(row_ids, row_mask) if keep]
            seen.append(prompt)
            text = tokenizer.decode(prompt)
            reply = next(r for key, r in replies.items() if key in text)
            outs.append(tokenizer.encode(reply) + [tokenizer.eos_id] + junk)  # anything after EOS is ignored
        width = max(map(len, outs))
        new = [o + [tokenizer.eos_id] * (width - len(o)) for o in outs]
        return torch.cat([ids, torch.tensor(new)], dim=1)

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    model = torch.nn.Linear(1, 1)  # only its device is read
    result = exact_match(model, tokenizer, rows, batch_size=2, n_samples=4)
    assert seen == expected_prompts  # the chat up to the final assistant turn, in row order
    assert "A helper." in tokenizer.decode(seen[1])  # earlier turns stay in the prompt
    assert result["n"] == 5 and result["exact_match"] == pytest.approx(4 / 5)
    assert [s["prediction"] for s in result["samples"]] == ["Brown.", "SUNDAY", "ten", "Paris!"]
    assert [s["correct"] for s in result["samples"]] == [True, True, False, True]
    assert result["samples"][0]["prompt"] == "<s>[INST] Which colour is the ball? [/INST]"
    assert result["samples"][2]["answer"] == "eleven"


def test_batched_left_padded_generation_equals_one_by_one(tokenizer, our_model, tiny):
    model = our_model(tiny(vocab_size=tokenizer.vocab_size, bos_token_id=1, eos_token_id=2))
    rows = load_rows(DataSpec(format="messages"), "eval").rows[:6]  # bundled rows: canonical, with answers
    assert len({len(r["messages"][0]["content"]) for r in rows}) > 1  # prompts of different lengths
    single = exact_match(model, tokenizer, rows, max_new_tokens=6, batch_size=1, n_samples=6)
    predictions = [s["prediction"] for s in single["samples"]]
    # make every other row right (with a trailing dot that normalisation removes)
    controlled = [{**row, "answer": p + "." if i % 2 == 0 else "zzz"} for i, (row, p) in enumerate(zip(rows, predictions))]
    model.train()
    batched = exact_match(model, tokenizer, controlled, max_new_tokens=6, batch_size=4, n_samples=6)
    assert [s["prediction"] for s in batched["samples"]] == predictions
    assert batched["exact_match"] == pytest.approx(0.5) and batched["n"] == 6
    assert model.training


def test_rows_missing_answers(tokenizer, monkeypatch):
    rows = [_row("Which colour is the ball?", "brown", 1), _row("Two plus two?", "four", 7)]
    del rows[1]["answer"]
    with pytest.raises(ValueError, match=r"eval.jsonl row 7: no 'answer' field"):
        exact_match(torch.nn.Linear(1, 1), tokenizer, rows)
    del rows[0]["answer"]

    def never(*args, **kwargs):
        raise AssertionError("nothing to score: generate must not run")

    monkeypatch.setattr(evaluate, "generate", never)
    result = exact_match(torch.nn.Linear(1, 1), tokenizer, rows)
    assert result["n"] == 0 and math.isnan(result["exact_match"]) and result["samples"] == []
    bad = [{**_row("Two plus two?", "four", 9), "answer": 4}]
    with pytest.raises(ValueError, match="eval.jsonl row 9: 'answer' must be a string, got int"):
        exact_match(torch.nn.Linear(1, 1), tokenizer, bad)
