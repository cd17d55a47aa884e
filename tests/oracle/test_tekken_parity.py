"""Tekken text encode/decode against mistral-common's Tekkenizer, byte for byte, on both shipped
tekken files; tokenizer.json folders of Tekken models (as transformers converts them) load to the
same ids, and one carrying the Llama-3 split regex (transformers#42299) is detected and corrected."""

import json
import shutil
from importlib import resources
from pathlib import Path

import pytest
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from mistral_train.tokenizer.tokenizer import _LLAMA3_PATTERN, load_tokenizer

DATA = Path(str(resources.files("mistral_common") / "data"))
FILES = ["tekken_240718.json", "tekken_240911.json"]
CORPUS = [
    "안녕하세요, 세계! 오늘 날씨가 좋네요. 한국어 형태소",
    "emoji 🎉🚀 and a family 👩‍👩‍👧 and flags 🇰🇷🇫🇷",
    "def f(x):\n\tif x:\n\t\treturn  x   *  2\n\n\n# end\r\n",
    "    four spaces\n        eight\t\ttabs   \n\n\n   ",
    "rare CJK 𠜎𠜱𠝹 control \x00\x01\x07\x1b[0m \x7f \u200b\ufeff",
    "12345678 it's O'Neil's eBay NaOH pH 3.14159 don't we'll",
    "नमस्ते दुनिया, สวัสดีครับ",  # combining marks: the Llama-3 regex splits these words apart
    "[INST] literal <s> </s> [TOOL_CALLS] [/INST]",
    "", " ", "\n",
]


@pytest.fixture(scope="module", params=FILES)
def pair(request):
    path = DATA / request.param
    return load_tokenizer(path), Tekkenizer.from_file(path)


def test_encode_decode_equal_tekkenizer(pair):
    ours, ref = pair
    assert ours.kind == "tekken" and ours.vocab_size == ref.n_words
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_id, ref.eos_id, ref.pad_id)
    for text in CORPUS:
        ids = ours.encode(text)
        assert ids == ref.encode(text, bos=False, eos=False), text
        assert ours.decode(ids) == ref.decode(ids) == text
    framed = ours.encode(CORPUS[0], bos=True, eos=True)
    assert ours.decode(framed, skip_special=False) == ref.decode(framed, special_token_policy=SpecialTokenPolicy.KEEP)


def test_decode_of_split_utf8_equals_tekkenizer(pair):
    """Slices that cut a character's bytes, and special tokens between the halves, decode as
    mistral-common does (U+FFFD on each side of the cut)."""
    ours, ref = pair
    ids = ours.encode("한국어 🎉 ü")
    assert any("\ufffd" in ours.decode(ids[:k]) for k in range(1, len(ids)))  # some cut splits a character
    for k in range(len(ids) + 1):
        for part in (ids[:k], ids[k:], ids[:k] + [ours.eos_id] + ids[k:]):
            assert ours.decode(part) == ref.decode(part)
            assert ours.decode(part, skip_special=False) == ref.decode(part, special_token_policy=SpecialTokenPolicy.KEEP)
    assert [ours.id_to_piece(i) for i in ids] == [ref.id_to_piece(i) for i in ids]


def test_long_text_cut_into_parts_equals_one_pass(pair):
    """Above 1 MiB the text is cut at line breaks before letters and encoded on threads."""
    ours, ref = pair
    text = "".join(CORPUS) * 5000 + "\nTail words"  # ~1.1 M characters, many cut points
    assert len(text) > 1 << 20
    assert ours.encode(text) == ref.encode(text, bos=False, eos=False)


def test_folder_with_tekken_json_and_its_version(tmp_path):
    shutil.copy(DATA / "tekken_240911.json", tmp_path / "tekken.json")
    loaded = load_tokenizer(tmp_path)
    assert loaded.kind == "tekken" and loaded.chat_format() == "v3"


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """(folder with the tokenizer.json transformers converts from tekken_240911.json, the same with
    the Llama-3 regex written into it, as some Tekken models shipped)."""
    from transformers.integrations.mistral.tokenizer import MistralConverter

    data = json.loads(MistralConverter(str(DATA / "tekken_240911.json")).converted().to_str())
    good, bad = tmp_path_factory.mktemp("hf_good"), tmp_path_factory.mktemp("hf_bad")
    (good / "tokenizer.json").write_text(json.dumps(data))
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = _LLAMA3_PATTERN
    (bad / "tokenizer.json").write_text(json.dumps(data))
    return good, bad


def test_tokenizer_json_of_tekken_equals_tekkenizer(hf_folders, recwarn):
    ref = Tekkenizer.from_file(DATA / "tekken_240911.json")
    ours = load_tokenizer(hf_folders[0])
    assert ours.kind == "hf_json" and not [w for w in recwarn if "regex" in str(w.message)]
    for text in CORPUS:
        assert ours.encode(text) == ref.encode(text, bos=False, eos=False), text


def test_llama3_regex_in_tokenizer_json_is_corrected_with_a_warning(hf_folders):
    import tokenizers

    good, bad = hf_folders
    raw = tokenizers.Tokenizer.from_file(str(bad / "tokenizer.json"))
    text = CORPUS[6]
    # the wrong regex really changes ids: its \p{L}+ leaves out combining marks (\p{M}), which Tekken's keeps in words
    assert raw.encode(text, add_special_tokens=False).ids != load_tokenizer(good).encode(text)
    with pytest.warns(UserWarning, match=r"tokenizer.json: the pre-tokenizer regex is the Llama-3 pattern.*42299"):
        fixed = load_tokenizer(bad)
    ref = Tekkenizer.from_file(DATA / "tekken_240911.json")
    for text in CORPUS:
        assert fixed.encode(text) == ref.encode(text, bos=False, eos=False), text
