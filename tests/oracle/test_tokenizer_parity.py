"""Tokenizer parity: text ids against raw sentencepiece and transformers, chat ids and the
assistant mask against mistral-common 1.13's official instruct encoders (v1, v2, v3)."""

import shutil

import pytest
import sentencepiece
from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral_train.tokenizer.tokenizer import bundled_tokenizer_path, load_tokenizer
from tests._tokenizers import raw_sentencepiece

VERSIONS = ["v1", "v2", "v3"]
CORPUS = [
    "안녕하세요, 세계! 오늘 날씨가 좋네요.",
    "emoji 🎉🚀 and a family 👩‍👩‍👧 and flags 🇰🇷",
    "def f(x):\n\tif x:\n\t\treturn  x   *  2\n\n\n# end\r\n",
    "rare CJK 𠜎𠜱𠝹 and control \x00\x01\x07\x1b[0m \x7f \u200b\ufeff bytes",
    "   leading and trailing   ",
    "",
    " ",
    "\n\n",
    "Mixed 日本語, Ελληνικά, العربية, עברית and Zürich naïve café",
]
# text that looks like special tokens stays text in sentencepiece and mistral-common
LITERAL_SPECIALS = "[INST] literal <s> and </s> [/INST]"

SYSTEM = {"role": "system", "content": "You are terse.\nAnswer in one line."}
TURNS = [
    ({"role": "user", "content": "What colour is grass?"}, {"role": "assistant", "content": "Green.  "}),
    ({"role": "user", "content": "  와 한국어?\n\tcode: `x  = 1`"}, {"role": "assistant", "content": "네 🎉\nok"}),
    ({"role": "user", "content": LITERAL_SPECIALS}, {"role": "assistant", "content": " spaced answer "}),
]


def conversations():
    """(id, messages) with and without a system message, 1-3 turns, ending in assistant."""
    for n in (1, 2, 3):
        for system in (False, True):
            msgs = [SYSTEM] * system + [m for turn in TURNS[:n] for m in turn]
            yield f"{n}turns{'-system' if system else ''}", msgs


CHATS = list(conversations())


@pytest.fixture(scope="module", params=VERSIONS)
def pair(request):
    """(our tokenizer, mistral-common test-mode tokenizer, finetuning-mode tokenizer)."""
    path = bundled_tokenizer_path(request.param)
    ours = load_tokenizer(path)
    official = getattr(MistralTokenizer, request.param)()
    assert official.instruct_tokenizer.tokenizer.file_path == path  # same file on both sides
    return ours, official, MistralTokenizer.from_file(str(path), mode=ValidationMode.finetuning)


@pytest.mark.parametrize("version", VERSIONS)
def test_text_ids_equal_sentencepiece(version):
    path = bundled_tokenizer_path(version)
    sp = raw_sentencepiece(version)
    ours = load_tokenizer(path)
    for text in CORPUS + [LITERAL_SPECIALS]:
        assert ours.encode(text) == sp.encode(text), text
        assert ours.decode(ours.encode(text)) == sp.decode(sp.encode(text)) == text
    # the corpus really exercises byte fallback
    assert any(ours.id_to_piece(i).startswith("<0x") for i in ours.encode(CORPUS[3]))


def _official(tokenizer, msgs):
    return tokenizer.encode_chat_completion(ChatCompletionRequest(messages=msgs)).tokens


@pytest.mark.parametrize("name,msgs", CHATS, ids=[c[0] for c in CHATS])
def test_prompt_ids_equal_mistral_common(pair, name, msgs):
    ours, official, _ = pair
    prompt = msgs[:-1]  # ends in a user turn, as mistral-common's test mode requires
    assert ours.apply_chat_template(prompt, add_generation_prompt=True) == _official(official, prompt)


@pytest.mark.parametrize("name,msgs", CHATS, ids=[c[0] for c in CHATS])
def test_full_chat_ids_equal_mistral_common(pair, name, msgs):
    ours, official, finetuning = pair
    ids = ours.apply_chat_template(msgs)
    # finetuning mode encodes a chat that ends with the assistant answer (closed by EOS)
    assert ids == _official(finetuning, msgs)
    # ... which is the prompt plus the answer as mistral-common's encode_assistant_message writes it
    answer = official.instruct_tokenizer.encode_assistant_message(
        AssistantMessage(content=msgs[-1]["content"]), is_before_last_user_message=False)
    assert ids == _official(official, msgs[:-1]) + answer


@pytest.mark.parametrize("name,msgs", CHATS, ids=[c[0] for c in CHATS])
def test_mask_equals_mistral_common_message_spans(pair, name, msgs):
    """Rebuild mistral-common's encode_instruct message by message from its own encoders, check
    the concatenation is its official encoding, and take the assistant spans as the mask."""
    ours, _, finetuning = pair
    request = finetuning._instruct_request_normalizer.from_chat_completion_request(
        ChatCompletionRequest(messages=msgs))
    inst = finetuning.instruct_tokenizer
    first, last = inst.find_first_last_user(request)
    expected_ids, expected_mask = inst.start(), [False]
    for k, message in enumerate(request.messages):
        if isinstance(message, UserMessage):
            piece = inst.encode_user_message(message, None, k == last, k == first,
                                             system_prompt=request.system_prompt)[0]
        else:
            piece = inst.encode_assistant_message(message, is_before_last_user_message=k < last)
        expected_ids += piece
        expected_mask += [isinstance(message, AssistantMessage)] * len(piece)
    assert expected_ids == _official(finetuning, msgs)
    assert ours.encode_chat(msgs) == (expected_ids, expected_mask)


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """{version: (folder with tokenizer.model, folder with transformers' tokenizer.json)}."""
    from transformers import AutoTokenizer

    folders = {}
    for version in ("v1", "v3"):
        spm_dir = tmp_path_factory.mktemp(f"spm_{version}")
        shutil.copy(bundled_tokenizer_path(version), spm_dir / "tokenizer.model")
        json_dir = tmp_path_factory.mktemp(f"json_{version}")
        AutoTokenizer.from_pretrained(spm_dir).save_pretrained(json_dir)
        folders[version] = (spm_dir, json_dir)
    return folders


def test_transformers_auto_tokenizer_matches_on_plain_text(hf_folders):
    from transformers import AutoTokenizer

    spm_dir, _ = hf_folders["v1"]
    reference = AutoTokenizer.from_pretrained(spm_dir)
    ours = load_tokenizer(spm_dir)
    for text in CORPUS:
        assert ours.encode(text) == reference.encode(text, add_special_tokens=False), text
    assert (ours.bos_id, ours.eos_id) == (reference.bos_token_id, reference.eos_token_id)


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_tokenizer_json_backend_matches_sentencepiece_and_mistral_common(hf_folders, version):
    _, json_dir = hf_folders[version]
    ours = load_tokenizer(json_dir)
    reference = load_tokenizer(bundled_tokenizer_path(version))
    assert ours.kind == "hf_json" and ours.chat_format() == version
    assert (ours.vocab_size, ours.bos_id, ours.eos_id) == (reference.vocab_size, reference.bos_id, reference.eos_id)
    for text in CORPUS + [LITERAL_SPECIALS]:
        assert ours.encode(text) == reference.encode(text), text
        assert ours.decode(ours.encode(text)) == text
    official = MistralTokenizer.from_file(str(bundled_tokenizer_path(version)), mode=ValidationMode.finetuning)
    for _, msgs in CHATS:
        assert ours.apply_chat_template(msgs) == _official(official, msgs)
        assert ours.encode_chat(msgs) == reference.encode_chat(msgs)
