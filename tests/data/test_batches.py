"""build_batches: fixed-size batches from text and chat data (packed and padded), an exact
mid-epoch position, the audit before anything trains, and per-batch padding share."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice

import pytest
import torch

from mistral_train.config import DataSpec, RunConfig, TrainerSpec
from mistral_train.data.audit import AuditError
from mistral_train.train.run_data import read_data
from mistral_train.data.epochs import SmallDataError
from mistral_train.data.pair_batches import attach_reference, pair_key
from mistral_train.data.collate import padding_share
from mistral_train.data.sft import tokenize_rows
from mistral_train.data.sources import bundled_chat_path, bundled_pairs_path, load_rows
from mistral_train.tokenizer.tokenizer import bundled_tokenizer_path, load_tokenizer

IGNORE = -100


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(bundled_tokenizer_path("v1"))


def small_chat(folder, n=40):
    """The first `n` bundled conversations: several epochs in a few batches."""
    path = folder / "chat.jsonl"
    path.write_text("\n".join(bundled_chat_path().read_text().splitlines()[:n]) + "\n")
    return path


def chat_config(path, packing, batch_size=4, max_seq_len=64, **data) -> RunConfig:
    return RunConfig(data=DataSpec(path=str(path), format="messages", packing=packing, **data),
                     trainer=TrainerSpec(objective="sft", max_seq_len=max_seq_len, batch_size=batch_size, seed=3))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("packing", [True, False])
def test_chat_batches_have_fixed_rows_and_the_run_collators_shape(tmp_path, tokenizer, packing):
    data = read_data(chat_config(small_chat(tmp_path), packing), tokenizer)
    assert data.stats.total().examples == 40 and data.report is not None
    assert data.eval_batches is None and data.eval_rows is None  # a user file without eval_path/fraction
    seen = []
    for batch in islice(data.train, 12):  # several epochs of the small set
        assert batch["input_ids"].shape[0] == 4 and batch["labels"].shape == batch["input_ids"].shape
        assert ("position_ids" in batch) == packing and ("attention_mask" in batch) == (not packing)
        assert "pad_mask" in batch if packing else True
        assert (batch["labels"][:, 1:] != IGNORE).any()
        seen.append(batch)
    assert data.train.epoch >= 1  # crossed an epoch boundary
    shares = [padding_share(b) for b in seen]
    assert all(0.0 <= s < 1.0 for s in shares)
    if not packing:  # one example per row, padded to the batch's longest: lengths differ, so padding exists
        assert max(shares) > 0.0
        # every example of an epoch appears once: the first epoch's batches hold distinct rows
        first_epoch = [tuple(row.tolist()) for b in seen[: int(data.train.batches_per_epoch)] for row in b["input_ids"]]
        assert len(set(first_epoch)) == len(first_epoch)


@pytest.mark.parametrize("packing", [True, False])
def test_bundled_chat_holds_out_the_eval_file_with_answers(tokenizer, packing):
    cfg = RunConfig(data=DataSpec(format="messages", packing=packing),
                    trainer=TrainerSpec(objective="sft", max_seq_len=128, batch_size=8))
    data = read_data(cfg, tokenizer)
    assert len(data.eval_rows) == 100 and all("answer" in row for row in data.eval_rows)
    # each held-out answer and its EOS are the labels (the template encodes the answer on its own)
    label_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in data.eval_batches)
    assert label_tokens == sum(len(tokenizer.encode(row["answer"])) + 1 for row in data.eval_rows)
    assert any("packed" in line for line in data.summary) == packing
    assert any("SFT data audit" in line for line in data.summary)


@pytest.mark.parametrize("kind", ["text", "packed", "padded"])
def test_restored_position_gives_the_same_next_batches_mid_epoch(tmp_path, tokenizer, kind):
    if kind == "text":
        corpus = tmp_path / "corpus.txt"
        corpus.write_text("\n\n".join(f"Document {i} says the number {i} is here." * 3 for i in range(40)))
        cfg = RunConfig(data=DataSpec(path=str(corpus)), trainer=TrainerSpec(max_seq_len=32, batch_size=3, seed=5))
    else:
        cfg = chat_config(small_chat(tmp_path), kind == "packed", batch_size=3)
    first = read_data(cfg, tokenizer).train
    per_epoch = int(first.batches_per_epoch)
    assert per_epoch >= 2
    for _ in range(per_epoch + 1):  # into the second epoch, one batch past its start
        next(first)
    state = first.state_dict()
    assert state["epoch"] == 1 and 0 < state["index"] < len(first.items)
    expected = list(islice(first, per_epoch + 2))  # the rest of this epoch and into the next
    second = read_data(cfg, tokenizer).train  # a fresh process rebuilding the same data
    second.load_state_dict(state)
    got = list(islice(second, per_epoch + 2))
    assert all(same(a, b) for a, b in zip(expected, got))
    # and the position really matters: from the start, the batches differ
    fresh = read_data(cfg, tokenizer).train
    assert not all(same(a, b) for a, b in zip(expected, islice(fresh, per_epoch + 2)))


def test_position_saved_for_other_data_is_refused(tmp_path, tokenizer):
    cfg = chat_config(small_chat(tmp_path), True)
    state = read_data(cfg, tokenizer).train.state_dict()
    other = read_data(chat_config(small_chat(tmp_path, n=60), True), tokenizer).train
    with pytest.raises(ValueError, match="n_items=.*resume needs the same data"):
        other.load_state_dict(state)


def test_packed_chat_too_small_for_a_batch_counts_examples_and_names_the_settings(tmp_path, tokenizer):
    """40 conversations packed into a few rows of 256 tokens: the message counts the 40 examples, says
    what packing made of them, and which settings to change."""
    cfg = chat_config(small_chat(tmp_path), True, batch_size=8, max_seq_len=256)
    rows = len(read_data(cfg, tokenizer, check=False).train.items)
    assert rows < 8
    with pytest.raises(SmallDataError) as caught:
        read_data(cfg, tokenizer)
    assert str(caught.value) == (
        f"data.path {tmp_path / 'chat.jsonl'}: packed 40 examples into {rows} rows of at most 256 tokens "
        f"(trainer.max_seq_len), fewer than trainer.batch_size=8; lower trainer.batch_size to {rows}, "
        "set data.packing=false (one example per row: 40 rows) or add data")


def test_padded_text_and_pair_data_too_small_for_a_batch_count_the_users_units(tmp_path, tokenizer):
    long_prompt = "Please answer this question. " * 30  # about 180 tokens: over max_seq_len=64
    path = tmp_path / "few.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "yes"}]}
            for i in range(3)]
    rows.append({"messages": [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "no"}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SmallDataError, match=r"few.jsonl: 3 examples of at most 64 tokens \(trainer.max_seq_len; "
                                             r"1 more row dropped for length\), one per row, fewer than "
                                             r"trainer.batch_size=4; lower trainer.batch_size to 3 or add data$"):
        read_data(chat_config(path, False), tokenizer)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Document {i} says the number {i} is here." for i in range(3)))
    cfg = RunConfig(data=DataSpec(path=str(corpus)), trainer=TrainerSpec(max_seq_len=16, batch_size=8))
    with pytest.raises(SmallDataError, match=r"corpus.txt: 3 documents -> \d rows of 16 tokens "
                                             r"\(trainer.max_seq_len\), fewer than trainer.batch_size=8; lower trainer.batch_size to \d, "
                                             r"lower trainer.max_seq_len \(more, shorter rows\) or add text$"):
        read_data(cfg, tokenizer)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Say {i}.", "chosen": "yes", "rejected": "no"}) + "\n"
                             for i in range(3)))
    cfg = RunConfig(data=DataSpec(path=str(pairs), format="preference"),
                    trainer=TrainerSpec(objective="dpo", max_seq_len=64, batch_size=4))
    with pytest.raises(SmallDataError, match=r"pairs.jsonl: 3 preference pairs, fewer than trainer.batch_size=4; "
                                             r"lower trainer.batch_size to 3 or add pairs$"):
        read_data(cfg, tokenizer)


def test_examples_lost_or_cut_for_length_end_the_summary_as_warnings(tmp_path, tokenizer):
    long_prompt = "Please answer this question. " * 30  # about 180 tokens, over max_seq_len=64
    long_answer = "This answer goes on and on. " * 30
    path = tmp_path / "long.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "yes"}]}
            for i in range(6)]
    rows += [{"messages": [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "no"}]}] * 2
    rows += [{"messages": [{"role": "user", "content": "Talk."}, {"role": "assistant", "content": long_answer}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    name = f"data.path {path}"
    cut = read_data(chat_config(path, True, batch_size=1), tokenizer)
    assert cut.warnings == [
        f"warning: {name}: 2 of 9 examples dropped: cut to trainer.max_seq_len=64 (data.overlong=truncate), nothing "
        "trained was left (the prompt fills the limit); raise trainer.max_seq_len",
        f"warning: {name}: 1 of 9 examples cut to their first 64 tokens (trainer.max_seq_len=64, "
        "data.overlong=truncate): what follows is not trained; raise trainer.max_seq_len or set data.overlong=drop"]
    assert cut.summary[-2:] == cut.warnings  # last, after the audit table: the run and the audit print them
    dropped = read_data(chat_config(path, True, batch_size=1, overlong="drop"), tokenizer)
    assert dropped.warnings == [f"warning: {name}: 3 of 9 examples dropped as longer than trainer.max_seq_len=64 "
                                "(data.overlong=drop); raise trainer.max_seq_len, or set data.overlong=truncate to "
                                "train their first tokens"]
    assert read_data(chat_config(small_chat(tmp_path, n=8), True, batch_size=1, max_seq_len=256),
                         tokenizer).warnings == []  # nothing lost: no warning


def test_pairs_lost_or_cut_for_length_are_warned_with_the_settings(tmp_path, tokenizer):
    long_prompt = "Please answer this question. " * 30
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Say {i}.", "chosen": "yes", "rejected": "no"} for i in range(3)]
    rows.append({"prompt": long_prompt, "chosen": "yes", "rejected": "no"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def warnings(**data):
        cfg = RunConfig(data=DataSpec(path=str(path), format="preference", **data),
                        trainer=TrainerSpec(objective="dpo", max_seq_len=64, batch_size=2))
        return read_data(cfg, tokenizer).warnings

    name = f"data.path {path}"
    assert warnings(overlong="drop", max_prompt_len=40) == [
        f"warning: {name}: 1 of 4 pairs dropped as longer than trainer.max_seq_len=64 or data.max_prompt_len=40 "
        "(data.overlong=drop); raise the limit, or set data.overlong=truncate to cut them instead"]
    assert warnings() == [f"warning: {name}: 1 of 4 pairs had the start of their prompt cut to fit "
                          "trainer.max_seq_len=64 (data.overlong=truncate); raise the limit or set data.overlong=drop"]


def test_audit_command_prints_its_table_before_the_batch_size_error(tmp_path, capsys):
    from mistral_train.cli import main

    path = small_chat(tmp_path)
    status = main(["audit", "recipe=tiny_sft", f"data.path={path}", "data.eval_fraction=0", "data.eval_path=null"])
    out, err = capsys.readouterr()
    assert status == 2
    assert "SFT data audit" in out and f"{path}" in out and "packed 40 examples into" in out
    assert "fewer than trainer.batch_size=8" in err and "packed 40 examples" in err and "Traceback" not in err


def test_prompts_longer_than_max_seq_len_leave_nothing_to_train_and_stop_before_training(tmp_path, tokenizer):
    long_prompt = "Please answer this question. " * 30  # about 180 tokens, cut at 64: the answer is gone
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": long_prompt + str(i)},
                                                     {"role": "assistant", "content": "yes"}]}) + "\n"
                            for i in range(6)))
    with pytest.raises(AuditError, match=r"no examples left to train on: .*long.jsonl: 6 rows dropped"):
        read_data(chat_config(path, True, train_on="last_assistant"), tokenizer)


def test_a_template_that_marks_no_answer_is_stopped_naming_the_row(tmp_path, tokenizer, monkeypatch):
    """A broken chat template whose mask covers no assistant token would leave every label -100."""
    path = small_chat(tmp_path, n=8)
    real = type(tokenizer).encode_chat

    def no_answers(self, messages, chat_format=None):
        ids, mask = real(self, messages, chat_format)
        return ids, [False] * len(mask)

    monkeypatch.setattr(type(tokenizer), "encode_chat", no_answers)
    with pytest.raises(ValueError, match=r"chat.jsonl row 1: the chat template marked 0 assistant spans"):
        read_data(chat_config(path, False), tokenizer)


def _rows_of(batches, n):
    """(batch, identity of each trained document in it) for n batches: documents are told apart by
    their token ids (position 0 restarts in packed rows; padded rows hold one example each)."""
    out = []
    for batch in islice(batches, n):
        docs = []
        for b in range(batch["input_ids"].shape[0]):
            ids, labels = batch["input_ids"][b], batch["labels"][b]
            if "position_ids" in batch:
                starts = (batch["position_ids"][b] == 0).nonzero().flatten().tolist()
                ends = starts[1:] + [ids.shape[0]]
            else:
                starts, ends = [0], [int(batch["attention_mask"][b].sum())]
            for start, end in zip(starts, ends):
                if (labels[start:end] != IGNORE).any():
                    docs.append(tuple(ids[start:end].tolist()))
        out.append((batch, docs))
    return out


@pytest.mark.parametrize("packing", [True, False])
def test_streaming_visits_every_example_once_per_epoch_and_carries_the_rest(tmp_path, tokenizer, packing):
    # n conversations in buffers of 10, 3 rows per batch: what a buffer cannot fill is carried into the
    # next one, at the end of the file into the next epoch. So the batches served before the first batch
    # of epoch 1, plus what was carried into epoch 1, are every conversation exactly once. Whether packed
    # rows leave a carry at the file's end depends on the conversations' lengths: the first n from 37 that does.
    for n in range(37, 47):
        path = small_chat(tmp_path, n=n)
        data = read_data(chat_config(path, packing, batch_size=3, streaming=True, stream_buffer=10), tokenizer)
        served = Counter()
        for _ in range(100):
            (_, docs), = _rows_of(data.train, 1)
            if data.train.epoch == 1:
                break
            served.update(docs)
        carried = Counter(tuple(ex.input_ids) for ex in data.train.carry)
        if sum(carried.values()) > 0:  # the case under test: something was carried over the epoch's end
            break
    else:
        pytest.fail("no file of 37-46 conversations leaves a carry at the epoch's end")
    assert data.report is not None and any("audited the first 10 rows" in n for n in data.report.notes)
    rows = list(load_rows(DataSpec(path=str(path), format="messages")))
    expected = Counter(tuple(ex.input_ids) for ex in tokenize_rows(rows, tokenizer, 64)[0])
    assert served + carried == expected
    assert data.train.epoch >= 1 and data.train.rows_per_epoch == n


@pytest.mark.parametrize("kind", ["text", "packed", "padded"])
def test_streaming_position_restores_mid_buffer_and_across_epochs(tmp_path, tokenizer, kind):
    if kind == "text":
        corpus = tmp_path / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": f"Document {i} says {i} " * (1 + i % 9)}) + "\n" for i in range(30)))
        cfg = RunConfig(data=DataSpec(path=str(corpus), streaming=True, stream_buffer=7),
                        trainer=TrainerSpec(max_seq_len=32, batch_size=3, seed=5))
    else:
        cfg = chat_config(small_chat(tmp_path, n=23), kind == "packed", batch_size=3, streaming=True, stream_buffer=7)
    first = read_data(cfg, tokenizer).train
    for stop in (2, 9, 25):  # inside the first buffer, later in the epoch, in a later epoch
        for _ in range(stop):
            next(first)
        state = first.state_dict()
        expected = list(islice(first, 6))
        second = read_data(cfg, tokenizer).train
        second.load_state_dict(state)
        assert all(same(a, b) for a, b in zip(expected, islice(second, 6)))
    assert first.epoch >= 1
    with pytest.raises(ValueError, match="buffer_rows=7, this run has buffer_rows=8"):
        cfg.data.stream_buffer = 8
        read_data(cfg, tokenizer).train.load_state_dict(state)


def test_streamed_text_is_cut_into_trained_pieces_of_max_seq_len(tmp_path, tokenizer):
    from mistral_train.data.stream import text_pieces

    row = {"text": "one two three four five six seven eight nine ten " * 5, "source": "f", "row": 4}
    ids = tokenizer.encode(row["text"], bos=True, eos=True)
    pieces = text_pieces(row, tokenizer, 16)
    assert [t for p in pieces for t in p.input_ids] == ids[: sum(len(p.input_ids) for p in pieces)]
    assert len(ids) - sum(len(p.input_ids) for p in pieces) <= 1  # only a lone last token has nothing to train
    assert all(len(p.input_ids) <= 16 and p.labels[0] == IGNORE and p.labels[1:] == p.input_ids[1:] for p in pieces)
    with pytest.raises(ValueError, match="f row 4: 'text' must be a non-empty string"):
        text_pieces({**row, "text": " "}, tokenizer, 16)


@pytest.mark.parametrize("packing", [True, False])
def test_reference_log_probs_ride_in_training_and_held_out_batches_after_one_collate_swap(tokenizer, packing):
    cfg = RunConfig(data=DataSpec(format="preference", eval_path=str(bundled_pairs_path("eval")), packing=packing),
                    trainer=TrainerSpec(objective="dpo", max_seq_len=64, batch_size=4, grad_accum_steps=2))
    data = read_data(cfg, tokenizer)
    plain = [dict(b) for b in data.eval_batches]
    # a table whose values say which pair and answer they belong to: +answer length (chosen), -length (rejected)
    table = {pair_key(p): torch.tensor([len(p.chosen_ids), -len(p.rejected_ids)], dtype=torch.float32)
             for p in list(data.train.items) + data.eval_items}
    attach_reference(data, table)
    for batch in [next(data.train), *data.eval_batches]:
        index, trained = batch["sequence_index"], batch["labels"] != IGNORE  # sequences 0..B-1 chosen, B..2B-1 rejected
        n = int(index.max()) + 1
        lengths = torch.tensor([float(((index == k) & trained).sum()) for k in range(n)])
        assert torch.equal(batch["ref_logps"], torch.cat([lengths[: n // 2], -lengths[n // 2 :]]))
    assert len(data.eval_batches) == len(plain) and all(  # the same held-out batches, each with ref_logps added
        same(plain[i], {k: v for k, v in b.items() if k != "ref_logps"}) for i, b in enumerate(data.eval_batches))
    assert len(data.eval_batches[0]["ref_logps"]) == 2 * 8  # batch_size * grad_accum_steps pairs per held-out batch
