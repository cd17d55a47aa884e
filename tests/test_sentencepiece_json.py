"""The tokenizer.json we build from a SentencePiece model gives sentencepiece's own ids on text
(runs of spaces, leading spaces, byte fallback, Korean, emoji, code) and decodes as it does."""

import random

import pytest
import sentencepiece
from sentencepiece import sentencepiece_model_pb2

from mistral_train.tokenizer.sentencepiece_json import sentencepiece_to_tokenizers
from mistral_train.tokenizer.tokenizer import bundled_tokenizer_path
from tests._tokenizers import raw_sentencepiece

FIXED = [
    "안녕하세요, 세계! 오늘 날씨가 좋네요.",
    "emoji 🎉🚀 and a family 👩‍👩‍👧 and flags 🇰🇷",
    "def f(x):\n\tif x:\n\t\treturn  x   *  2\n\n\n# end\r\n",
    "class A:\n    def f(self):\n        return {'k': [1, 2, 3]}  # ok\n",
    "rare CJK 𠜎𠜱𠝹 and control \x00\x01\x07\x1b[0m \x7f \u200b\ufeff bytes",
    "   leading and trailing   ", "", " ", "\n\n", "a  b   c", "  와",
    "text that looks special: [INST] <s> </s> [/INST]",
]
# runs of 0..39 spaces before a word and 0..18 after: sentencepiece merges them from the left
SPACES = [" " * n + "x" + " " * m + "y" for n in range(40) for m in range(0, 20, 3)]


def _random_texts(count: int) -> list[str]:
    rng = random.Random(0)
    alphabet = list("abcdefgh  \n\t.,;:()[]{}'\"0123456789éü한국어🎉") + ["the", " of", "    ", "ing", "tion", "▁"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(count)]


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_text_ids_and_decoding_equal_sentencepiece(version):
    path = bundled_tokenizer_path(version)
    sp = raw_sentencepiece(version)
    ours = sentencepiece_to_tokenizers(path)
    ours.encode_special_tokens = True  # compare on text: sentencepiece never parses control tokens
    texts = FIXED + SPACES + _random_texts(1500)
    wrong = [t for t in texts if ours.encode(t, add_special_tokens=False).ids != sp.encode(t)]
    assert wrong == []
    assert [ours.decode(sp.encode(t)) for t in texts] == [sp.decode(sp.encode(t)) for t in texts]
    # with special tokens (as transformers encodes): BOS in front, control pieces written in text are parsed
    ours.encode_special_tokens = False
    assert ours.encode("Hi").ids == [sp.bos_id(), *sp.encode("Hi")]
    if version != "v1":
        assert ours.encode("[INST]Hi", add_special_tokens=False).ids == [sp.piece_to_id("[INST]"), *sp.encode("Hi")]


def test_a_model_with_another_normalizer_is_refused(tmp_path):
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(bundled_tokenizer_path("v1").read_bytes())
    proto.normalizer_spec.remove_extra_whitespaces = True
    path = tmp_path / "odd.model"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(ValueError, match=r"odd.model: normalizer .*remove_extra_whitespaces=True.*expected Mistral's"):
        sentencepiece_to_tokenizers(path)
