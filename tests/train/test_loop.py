"""fit(): accumulation maths, a short real run whose loss falls, run-folder contents, resume."""

import contextlib
import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mistral_train import Mistral, MistralConfig
from mistral_train.config import DataSpec, RunConfig, RunSpec, TrackingSpec
from mistral_train.data.sources import bundled_chat_path
from mistral_train.tokenizer.tokenizer import load_tokenizer
from mistral_train.train import fit
from mistral_train.train.loop import backward_window
from mistral_train.train.steps import language_model
from tests._tiny import small_run


def _labels_with_holes(ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Labels equal to ids with a different number of -100 per row (like prompt masking)."""
    labels = ids.clone()
    for row in range(ids.shape[0]):
        labels[row, : int(torch.randint(0, ids.shape[1] - 2, (1,), generator=generator))] = -100
    return labels


def test_accumulation_of_k_micro_batches_equals_one_big_batch():
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
    model = Mistral(config)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (6, 24), generator=g)
    labels = _labels_with_holes(ids, g)
    counts = (labels[:, 1:] != -100).sum(1)
    assert len(set(counts.tolist())) > 3  # rows really differ in label count

    reference = model(ids, labels=labels)  # mean over every label token of the 6 rows
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    window = [{"input_ids": ids[i : i + 2], "labels": labels[i : i + 2]} for i in range(0, 6, 2)]
    objective = language_model(loss_chunk_size=7)  # chunks that straddle rows
    loss, n_tokens, _ = backward_window(model, objective, window, contextlib.nullcontext)
    assert n_tokens == int(counts.sum())
    assert loss == pytest.approx(reference.item(), abs=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)


def _tiny_run(tmp_path, name, **trainer) -> RunConfig:
    """A very small model on the real tokenizer and bundled corpus."""
    spec = dict(max_steps=6, max_seq_len=32, batch_size=2, warmup_steps=2, log_every=1, sample_max_new_tokens=5)
    return small_run(tmp_path, name, **{**spec, **trainer})


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_default_model_learns_in_20_steps_and_leaves_a_complete_run_folder(tmp_path, capsys):
    cfg = RunConfig(run=RunSpec(name="short", dir=str(tmp_path)), tracking=TrackingSpec(progress_bar=False))
    cfg.trainer = dataclasses.replace(cfg.trainer, max_steps=20, max_seq_len=64, log_every=1, sample_max_new_tokens=8)
    run_dir = fit(cfg)
    assert run_dir == tmp_path / "short"
    losses = _losses(run_dir)
    assert len(losses) == 20
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 2.0, (first, last)

    for name in ("config.yaml", "metrics.jsonl", "loss.png", "sample.txt", "final/config.json",
                 "final/model.safetensors", "final/tokenizer.model"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "loss.png").read_bytes().startswith(b"\x89PNG")
    # save_every is None by default: the last step still writes a checkpoint to resume or extend the run from
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_20"]
    sample = (run_dir / "sample.txt").read_text().strip()
    assert sample.startswith(cfg.trainer.sample_prompt) and sample in capsys.readouterr().out
    # final/ is usable on its own: model and tokenizer load from it
    model = Mistral.from_pretrained(run_dir / "final")
    tokenizer = load_tokenizer(run_dir / "final")
    assert model.config.vocab_size == tokenizer.vocab_size == 32000
    assert model.config.hidden_size == cfg.model.hidden_size


@pytest.mark.parametrize("streaming", [False, True])
def test_resumed_run_ends_with_the_same_weights(tmp_path, streaming):
    def run(name, **changes):
        cfg = _tiny_run(tmp_path, name, save_every=3, keep_last=5)
        if streaming:  # 8 chat rows read 5 at a time: the resumed steps cross buffer and epoch boundaries
            cfg.data = DataSpec(path=str(_small_chat(tmp_path)), format="messages", streaming=True, stream_buffer=5)
            cfg.trainer = dataclasses.replace(cfg.trainer, objective="sft")
        return dataclasses.replace(cfg, **changes)

    full = fit(run("full"))
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["step_3", "step_6"]

    # an "interrupted" run: only the step-3 checkpoint exists, then it resumes
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_3", cut / "checkpoints" / "step_3")
    with pytest.raises(FileExistsError, match="resume=latest"):
        fit(run("cut"))
    fit(run("cut", resume="latest"))

    a = load_file(full / "final" / "model.safetensors")
    b = load_file(cut / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _losses(cut) == _losses(full)[3:]  # the resumed run logs steps 4-6 only, identically


def _small_chat(folder, n=8):
    path = folder / "chat.jsonl"
    path.write_text("\n".join(bundled_chat_path().read_text().splitlines()[:n]) + "\n")
    return path


def test_bf16_accumulation_and_eval_run(tmp_path):
    cfg = _tiny_run(tmp_path, "bf16", max_steps=4, precision="bf16", grad_accum_steps=2, eval_every=2,
                    save_every=2, keep_last=1)
    cfg.data.eval_fraction = 0.01  # ~35 held-out rows: quick to evaluate
    cfg.tracking.plot = True
    run_dir = fit(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    assert all(r["eval_loss"] < 11 and r["loss"] < 11 for r in rows if "eval_loss" in r)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_4"]  # keep_last=1
    assert (run_dir / "loss.png").is_file()


def test_accumulation_over_padded_micro_batches_of_very_different_lengths_equals_one_batch():
    """k micro-batches, each padded to its own longest example, against one batch of all k*b examples padded
    to the longest overall: the same loss and gradients, because every label token weighs 1 / (window tokens)."""
    from mistral_train.data.collate import collate_padded
    from mistral_train.data.sft import SFTExample

    torch.manual_seed(0)
    model = Mistral(MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, sliding_window=None))
    g = torch.Generator().manual_seed(2)
    examples = []
    for n in (3, 61, 7, 40, 2, 25):  # 2 to 61 tokens; answers of different lengths
        ids = torch.randint(3, 256, (n,), generator=g).tolist()
        start = int(torch.randint(1, n, (1,), generator=g))
        examples.append(SFTExample(ids, [-100] * start + ids[start:], "t", len(examples), False))
    everything = collate_padded(examples, pad_id=0, max_seq_len=64)
    reference = model(everything["input_ids"], attention_mask=everything["attention_mask"], labels=everything["labels"])
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    window = [collate_padded(examples[i : i + 2], pad_id=0, max_seq_len=64) for i in range(0, 6, 2)]
    assert len({b["input_ids"].shape[1] for b in window}) == 3  # three different padded lengths
    loss, _, _ = backward_window(model, language_model(loss_chunk_size=16), window, contextlib.nullcontext)
    assert loss == pytest.approx(reference.item(), abs=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_the_epoch_metric_counts_epochs_and_the_run_warns_of_examples_cut_for_length(tmp_path, capsys):
    """7 chat examples, one per row, 4 per batch: no row is skipped at an epoch's end (the old batcher
    dropped 3 per epoch and logged 4/7, 1 + 4/7, 2 + 4/7), so the epoch column reads rows served / 7;
    the over-long answer is cut, and the run says so before step 1, naming the settings."""
    path = _small_chat(tmp_path, n=6)
    with path.open("a") as handle:
        handle.write(json.dumps({"messages": [{"role": "user", "content": "Talk."},
                                              {"role": "assistant", "content": "On and on. " * 40}]}) + "\n")
    cfg = _tiny_run(tmp_path, "epochs", max_steps=3, batch_size=4, objective="sft")
    cfg.data = DataSpec(path=str(path), format="messages", packing=False)
    run_dir = fit(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == pytest.approx([4 / 7, 8 / 7, 12 / 7])
    assert (f"warning: data.path {path}: 1 of 7 examples cut to their first 32 tokens (trainer.max_seq_len=32, "
            "data.overlong=truncate)") in capsys.readouterr().out
