"""Tokenizer loading, text encode/decode, chat validation and assistant masks (fast; the real
Mistral SentencePiece files shipped in mistral-common, plus a tiny tokenizers JSON built here)."""

import json
import shutil

from pathlib import Path
import pytest
import tokenizers

from mistral_train.tokenizer.tokenizer import bundled_tokenizer_path, load_tokenizer
from tests._tokenizers import bundled, raw_sentencepiece as _spm, with_tokenizer_model

TEXTS = ["Hello world", "  two  spaces\tand a tab\n\nnew lines ", "안녕하세요 🎉 𠜎 \x01", ""]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "colour of grass"},
    {"role": "assistant", "content": "green grass answer"},
    {"role": "user", "content": "colour of sky"},
    {"role": "assistant", "content": "blue sky answer "},
]


@pytest.fixture(scope="module", params=["v1", "v3"])
def tok(request):
    return bundled(request.param)


@pytest.fixture(scope="module")
def v1():
    return bundled("v1")


@pytest.fixture(scope="module")
def v3():
    return bundled("v3")


# ---- loading -------------------------------------------------------------------------------

def test_bundled_files_load_by_content_not_name(tok):
    # the bundled names end in .v1/.v3, not .model: the loader must still pick SentencePiece
    assert tok.kind == "sentencepiece"
    assert tok.path.name.endswith(("model.v1", "model.v3"))


def test_folder_and_explicit_kind(tmp_path, v1):
    with_tokenizer_model(tmp_path)
    for loaded in (load_tokenizer(tmp_path), load_tokenizer(tmp_path / "tokenizer.model", kind="sentencepiece")):
        assert loaded.encode(TEXTS[1]) == v1.encode(TEXTS[1])
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path, kind="hf_json")


def test_load_errors_name_path_and_expectation(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*tokenizer.model"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.model.*tokenizer\.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "junk.bin").write_bytes(b"\x00\x01 not a model")
    with pytest.raises(ValueError, match="junk.bin.*sentencepiece"):
        load_tokenizer(tmp_path / "junk.bin")
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match="tokenizer.json.*hf_json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="kind 'bpe'"):
        load_tokenizer(tmp_path, kind="bpe")
    with pytest.raises(ValueError, match="v9"):
        bundled_tokenizer_path("v9")


def test_special_ids_follow_sentencepiece(tok):
    sp = _spm("v1" if tok.vocab_size == 32000 else "v3")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (sp.vocab_size(), sp.bos_id(), sp.eos_id())
    assert tok.pad_id is None and sp.pad_id() == -1
    assert (tok.id_to_piece(tok.bos_id), tok.id_to_piece(tok.eos_id)) == ("<s>", "</s>")


def test_config_files_set_special_tokens(tmp_path, v1):
    with_tokenizer_model(tmp_path)
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<unk>"}}))
    assert load_tokenizer(tmp_path).pad_id == _spm("v1").unk_id()
    # tokenizer_config.json wins over special_tokens_map.json
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "</s>", "bos_token": "<s>"}))
    loaded = load_tokenizer(tmp_path)
    assert (loaded.pad_id, loaded.bos_id) == (v1.eos_id, v1.bos_id)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: eos_token '<\|im_end\|>' is not in the vocabulary"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON"):
        load_tokenizer(tmp_path)


def _tiny_json(folder, words, specials):
    """A word-level tokenizers JSON: ids of `specials` first, then `words`."""
    vocab = {w: i for i, w in enumerate(specials + ["<unk>"] + words)}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tk.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    tk.add_special_tokens(specials)
    tk.save(str(folder / "tokenizer.json"))


def test_hf_json_backend_chat_and_config(tmp_path):
    words = ["hi", "hello", "there", "INST", "[", "]", "/"]
    _tiny_json(tmp_path, words, ["<s>", "</s>", "[INST]", "[/INST]"])
    tk = load_tokenizer(tmp_path)
    assert tk.kind == "hf_json" and tk.chat_format() == "v3"
    assert (tk.bos_id, tk.eos_id, tk.pad_id) == (0, 1, None)
    assert tk.decode(tk.encode("hi there", bos=True, eos=True)) == "hi there"
    # special tokens written in text stay text, as with SentencePiece (no prompt injection)
    assert tk.encode("[INST] hi") == [tk.encode(w)[0] for w in ["[", "INST", "]", "hi"]]
    ids, mask = tk.encode_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}])
    assert ids == [0, 2, *tk.encode("hi"), 3, *tk.encode("hello there"), 1]
    assert mask == [False] * 4 + [True] * 3

    other = tmp_path / "no_bos"
    other.mkdir()
    _tiny_json(other, words, ["<bos>", "<eos>"])
    with pytest.raises(ValueError, match="no BOS token.*bos_token"):
        load_tokenizer(other)
    (other / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<eos>"}))
    tk = load_tokenizer(other)
    assert (tk.bos_id, tk.eos_id, tk.pad_id, tk.chat_format()) == (0, 1, 1, "v1")


# ---- text ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.bos_id not in ids and tok.eos_id not in ids  # nothing implicit
    framed = tok.encode(text, bos=True, eos=True)
    assert framed == [tok.bos_id, *ids, tok.eos_id]
    assert tok.decode(framed) == text
    kept = tok.decode(framed, skip_special=False)
    assert kept.startswith("<s>") and kept.endswith("</s>")


def test_decode_rejects_out_of_range_and_non_str(v1):
    with pytest.raises(ValueError, match="out of range"):
        v1.decode([5, v1.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        v1.id_to_piece(-1)
    with pytest.raises(ValueError, match="expects a str"):
        v1.encode(123)


# ---- chat ----------------------------------------------------------------------------------

BAD_CHATS = [
    ([], "empty conversation"),
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "message 1: unknown role 'bot'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1: expected role 'assistant'"),
    ([{"role": "assistant", "content": "a"}], "message 0: expected role 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "message 1: conversation ends with a system"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "message 1: expected role 'user'"),
    ([{"role": "user", "content": ["a"]}], "message 0: content must be a string"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}], "message 1: assistant content is empty"),
    ([{"role": "system", "content": "s"}], "message 0: .*no user message"),
    ([{"role": "user"}], "message 0: expected a dict with 'role' and 'content'"),
]


@pytest.mark.parametrize("messages,error", BAD_CHATS)
def test_chat_validation_errors(v3, messages, error):
    with pytest.raises(ValueError, match=error):
        v3.encode_chat(messages)
    with pytest.raises(ValueError, match=error):
        v3.apply_chat_template(messages)


def test_generation_prompt_needs_final_user(v1):
    with pytest.raises(ValueError, match="message 4: .*end with a user message"):
        v1.apply_chat_template(CHAT, add_generation_prompt=True)
    prompt = v1.apply_chat_template(CHAT[:4], add_generation_prompt=True)
    assert prompt == v1.apply_chat_template(CHAT[:4])


def test_chat_format_choice(v1, v3):
    assert (v1.chat_format(), v3.chat_format()) == ("v1", "v3")
    with pytest.raises(ValueError, match="'v3' needs \\[INST\\]"):
        v1.encode_chat(CHAT, chat_format="v3")
    with pytest.raises(ValueError, match="chat_format 'v4' unknown"):
        v3.encode_chat(CHAT, chat_format="v4")
    inst = v3.encode("[INST]")  # as text
    as_v1 = v3.apply_chat_template(CHAT, chat_format="v1")
    assert as_v1[1:1 + len(inst)] == inst and 3 not in as_v1 and v3.id_to_piece(3) == "[INST]"
    assert v3.apply_chat_template(CHAT, chat_format="v2") == v3.apply_chat_template(CHAT)


def _runs(mask):
    """(start, end) of each run of True."""
    runs, start = [], None
    for t, m in enumerate(mask + [False]):
        if m and start is None:
            start = t
        elif not m and start is not None:
            runs.append((start, t))
            start = None
    return runs


@pytest.mark.parametrize("n_turns", [1, 2])
@pytest.mark.parametrize("with_system", [False, True])
def test_mask_covers_exactly_the_answers_and_their_eos(tok, n_turns, with_system):
    chat = (CHAT if with_system else CHAT[1:])[: 2 * n_turns + with_system]
    ids, mask = tok.encode_chat(chat)
    assert ids == tok.apply_chat_template(chat) and len(mask) == len(ids)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1 and not mask[0]
    answers = [m["content"] for m in chat if m["role"] == "assistant"]
    runs = _runs(mask)
    assert len(runs) == len(answers) == ids.count(tok.eos_id)
    for (start, end), answer in zip(runs, answers):
        assert ids[end - 1] == tok.eos_id
        assert tok.decode(ids[start:end]) == (answer.rstrip(" ") if tok.chat_format() == "v3" else answer)
    prompt_text = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert all(m["content"] in prompt_text for m in chat if m["role"] != "assistant")
    assert not any(a.strip() in prompt_text for a in answers)
    # the prompt of the last turn is a prefix of the whole conversation, so generating from it
    # matches training on it
    assert ids[: len(tok.apply_chat_template(chat[:-1]))] == tok.apply_chat_template(chat[:-1])


def test_system_prompt_placement(v1, v3):
    # v1 puts the system prompt in the first user turn, v3 in the last (as mistral-common 1.13)
    for tk, before_first_answer in ((v1, True), (v3, False)):
        text = tk.decode(tk.apply_chat_template(CHAT[:4]))
        assert (text.index("Be brief.") < text.index("green grass")) == before_first_answer
        assert text.count("Be brief.") == 1


def test_resolve_tokenizer_path_prefers_the_model_folder(tmp_path):
    from mistral_train.tokenizer.tokenizer import bundled_tokenizer_path, resolve_tokenizer_path

    assert resolve_tokenizer_path(None) == bundled_tokenizer_path("v1")  # a fresh model
    assert resolve_tokenizer_path("bundled:v3") == bundled_tokenizer_path("v3")
    assert resolve_tokenizer_path("some/file.model") == Path("some/file.model")
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json"):
        resolve_tokenizer_path(None, tmp_path)  # a model folder without a tokenizer
    (tmp_path / "tokenizer.model").write_bytes(bundled_tokenizer_path("v1").read_bytes())
    assert resolve_tokenizer_path(None, tmp_path) == tmp_path
    with pytest.raises(ValueError, match="v9"):
        resolve_tokenizer_path("bundled:v9")
