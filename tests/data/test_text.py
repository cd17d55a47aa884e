"""Plain-text pretraining data: .txt documents, BOS/EOS wrapping, fixed-length rows."""

import pytest

from mistral_train.data.text import bundled_corpus_path, pack_rows, read_txt, tokenize_documents


class ByteTokenizer:
    """Stand-in tokenizer: one id per UTF-8 byte, shifted past BOS=1 / EOS=2."""

    bos_id, eos_id, vocab_size = 1, 2, 259

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + [b + 3 for b in text.encode()] + [self.eos_id] * eos


def test_txt_documents_are_blank_line_separated(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first doc\nline two\n\n\n  \nsecond\n\n")
    assert read_txt(path) == ["first doc\nline two", "second"]


def test_bundled_corpus_reads():
    docs = read_txt(bundled_corpus_path())
    assert len(docs) > 10 and all(doc.strip() == doc and doc for doc in docs)


def test_stream_wraps_each_document_in_bos_eos_and_packs():
    stream = tokenize_documents(["ab", "c"], ByteTokenizer())
    assert stream.tolist() == [1, 100, 101, 2, 1, 102, 2]
    rows = pack_rows(stream, 3)
    assert rows.tolist() == [[1, 100, 101], [2, 1, 102]]  # the tail (one token) is dropped
    with pytest.raises(ValueError, match="7 tokens do not fill one row of trainer.max_seq_len=8"):
        pack_rows(stream, 8)
