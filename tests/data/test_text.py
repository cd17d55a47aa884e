"""Plain-text pretraining data: reading, tokenizing, packing, shuffling, position state."""

import json

import pytest
import torch

from mistral_train.data.text import (
    TextBatches, build_text_batches, pack_rows, read_documents, split_documents, tokenize_documents,
)


class ByteTokenizer:
    """Stand-in tokenizer: one id per UTF-8 byte, shifted past BOS=1 / EOS=2."""

    bos_id, eos_id, vocab_size = 1, 2, 259

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + [b + 3 for b in text.encode()] + [self.eos_id] * eos


def test_txt_documents_are_blank_line_separated(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first doc\nline two\n\n\n  \nsecond\n\n")
    assert read_documents(path) == ["first doc\nline two", "second"]


def test_jsonl_folder_and_list(tmp_path):
    (tmp_path / "d").mkdir()
    rows = [json.dumps({"text": "x"}), "", json.dumps({"text": "y", "id": 3})]  # blank lines are skipped
    (tmp_path / "d" / "b.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "d" / "a.txt").write_text("t1\n\nt2")
    (tmp_path / "d" / "notes.md").write_text("ignored")
    assert read_documents(tmp_path / "d") == ["t1", "t2", "x", "y"]
    assert read_documents([tmp_path / "d" / "b.jsonl", tmp_path / "d" / "a.txt"]) == ["x", "y", "t1", "t2"]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"bad.jsonl:2: invalid JSON"),
        ('{"content": "x"}', r"bad.jsonl:2: expected an object with a 'text' field"),
        ('{"text": 5}', r"bad.jsonl:2: 'text' must be a string"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_documents(path)


def test_missing_and_unsupported_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_documents(tmp_path / "nope.txt")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="x.csv: unsupported"):
        read_documents(tmp_path / "x.csv")


def test_bundled_corpus_reads():
    docs = read_documents(None)
    assert len(docs) > 10 and all(doc.strip() == doc and doc for doc in docs)


def test_stream_wraps_each_document_in_bos_eos_and_packs():
    stream = tokenize_documents(["ab", "c"], ByteTokenizer())
    assert stream.tolist() == [1, 100, 101, 2, 1, 102, 2]
    rows = pack_rows(stream, 3)
    assert rows.tolist() == [[1, 100, 101], [2, 1, 102]]  # the tail (one token) is dropped
    with pytest.raises(ValueError, match="7 tokens do not fill one row of trainer.max_seq_len=8"):
        pack_rows(stream, 8)


def test_split_is_seeded_and_disjoint():
    docs = [f"doc{i}" for i in range(20)]
    train, held = split_documents(docs, 0.2, seed=3)
    assert len(held) == 4 and sorted(train + held) == sorted(docs)
    assert split_documents(docs, 0.2, seed=3) == (train, held)
    assert split_documents(docs, 0.2, seed=4)[1] != held


def test_batches_cover_each_epoch_once_and_reshuffle():
    rows = torch.arange(10).unsqueeze(1).repeat(1, 4)  # row i is all i
    batches = TextBatches(rows, batch_size=3, seed=0)
    epoch0 = [next(batches)["input_ids"][:, 0].tolist() for _ in range(3)]
    seen = sum(epoch0, [])
    assert len(set(seen)) == 9  # 3 full batches, the partial 4th is skipped
    first_next = next(batches)
    assert batches.epoch == 1
    assert torch.equal(first_next["input_ids"], first_next["labels"])
    epoch1 = [first_next["input_ids"][:, 0].tolist()] + [next(batches)["input_ids"][:, 0].tolist() for _ in range(2)]
    assert epoch1 != epoch0


def test_position_state_restores_exactly():
    rows = torch.arange(50).unsqueeze(1).repeat(1, 2)
    a = TextBatches(rows, batch_size=4, seed=7)
    for _ in range(17):  # into the second epoch
        next(a)
    state = a.state_dict()
    expected = [next(a)["input_ids"] for _ in range(10)]
    b = TextBatches(rows, batch_size=4, seed=7)
    b.load_state_dict(state)
    assert all(torch.equal(x, next(b)["input_ids"]) for x in expected)
    with pytest.raises(ValueError, match="seed=7, 50 rows; this run has seed=8"):
        TextBatches(rows, batch_size=4, seed=8).load_state_dict(state)


def test_build_text_batches(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(f"document number {i} " * 3 for i in range(30)))
    batches, held = build_text_batches(path, ByteTokenizer(), seq_len=16, batch_size=2, seed=0, eval_fraction=0.1)
    batch = next(batches)
    assert batch["input_ids"].shape == (2, 16) and batch["input_ids"].dtype == torch.long
    assert held is not None and held.shape[1] == 16
    with pytest.raises(ValueError, match="rows are fewer than trainer.batch_size=100000"):
        build_text_batches(path, ByteTokenizer(), seq_len=16, batch_size=100000, seed=0)
