"""Every folder we write is complete for transformers: `AutoTokenizer.from_pretrained(folder)` encodes
text as we do (BOS first), its `apply_chat_template` gives our `encode_chat` ids, which are
mistral-common's, for every chat format; generation_config.json loads; files follow the umask."""

import json
import os
import stat
from contextlib import contextmanager

import jinja2
import pytest
import transformers
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral_train import Mistral, MistralConfig
from mistral_train.checkpoint.atomic import atomic_directory
from mistral_train.config import AdapterSpec, DataSpec, ModelSpec, RunConfig, RunSpec, TrackingSpec, TrainerSpec
from mistral_train.tokenizer.tokenizer import bundled_tokenizer_path, load_tokenizer
from mistral_train.tokenizer.files import write_tokenizer_files
from mistral_train.train import fit
from tests._chat import A, S, U

VERSIONS = ["v1", "v2", "v3"]
SYSTEM = S("You are terse.\nAnswer in one line.")
CODE = "def f(x):\n    if x:\n        return  x   *  2\n\t# tab\n"
CHATS = {  # each ends with an assistant answer; its prompt (without the last answer) is tested too
    "one-turn": [U("What colour is grass?"), A("Green.")],
    "system": [SYSTEM, U("Hi"), A("Hello!")],
    "multi-turn-system": [SYSTEM, U("What colour is grass?"), A("Green.  "), U("  와 한국어?\n\tcode: `x  = 1`"),
                          A("네 🎉🚀 👩‍👩‍👧\nok"), U(CODE), A(" spaced answer ")],
    "code-answer": [U("Write f."), A(CODE), U("Again, in 한국어 🎉"), A("좋아요 " + CODE)],
    "systems-anywhere": [S("First rule."), S(""), U("Hi"), S("Second rule."), A("Hello!"), U("Bye"), A("Bye.")],
}
TEXTS = ["Hello world", "  와 한국어?\n\tcode", "emoji 🎉🚀 👩‍👩‍👧 🇰🇷", CODE, "a  b   c", ""]


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture(scope="module", params=VERSIONS)
def folder(request, tmp_path_factory):
    """(version, our tokenizer, folder written by write_tokenizer_files, transformers' tokenizer of it)."""
    ours = load_tokenizer(bundled_tokenizer_path(request.param))
    folder = tmp_path_factory.mktemp(request.param)
    write_tokenizer_files(ours, folder, request.param)
    return request.param, ours, folder, transformers.AutoTokenizer.from_pretrained(folder)


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def test_text_ids_start_with_bos_and_equal_ours(folder):
    _, ours, _, hf = folder
    for text in TEXTS:
        assert hf(text).input_ids == ours.encode(text, bos=True), text
        assert hf.decode(ours.encode(text), skip_special_tokens=True) == ours.decode(ours.encode(text)), text
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (ours.bos_id, ours.eos_id, 0)


@pytest.mark.parametrize("name", list(CHATS))
def test_chat_template_ids_equal_ours_and_mistral_common(folder, name):
    version, ours, _, hf = folder
    chat, path = CHATS[name], str(bundled_tokenizer_path(version))
    finetuning = MistralTokenizer.from_file(path, mode=ValidationMode.finetuning)
    official = finetuning.encode_chat_completion(ChatCompletionRequest.from_openai(messages=chat)).tokens
    assert _ids(hf.apply_chat_template(chat, tokenize=True)) == ours.encode_chat(chat, version)[0] == official
    prompt = chat[:-1]
    served = MistralTokenizer.from_file(path).encode_chat_completion(ChatCompletionRequest.from_openai(messages=prompt))
    assert (_ids(hf.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True))
            == ours.apply_chat_template(prompt, version, add_generation_prompt=True) == served.tokens)


def test_our_tokenizer_json_loaded_by_us_encodes_chats_as_sentencepiece(folder):
    version, ours, folder_path, _ = folder
    as_json = load_tokenizer(folder_path / "tokenizer.json", kind="hf_json")
    for chat in CHATS.values():
        assert as_json.encode_chat(chat, version) == ours.encode_chat(chat, version)


def test_template_refuses_what_our_encoder_refuses(folder):
    version, _, _, hf = folder
    with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
        hf.apply_chat_template([U("a"), U("b")])
    with pytest.raises(jinja2.TemplateError, match="ends with a user message"):
        hf.apply_chat_template([U("a"), A("b")], add_generation_prompt=True)
    with pytest.raises(jinja2.TemplateError, match="cannot follow an assistant"):
        hf.apply_chat_template([U("a"), A("b"), S("c"), U("d")])
    if version != "v1":  # v2/v3 take tools (tests/oracle/test_hf_tekken_folder_parity.py)
        return
    with pytest.raises(jinja2.TemplateError, match="tool definitions are not in this chat template"):
        hf.apply_chat_template([U("a")], tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    with pytest.raises(jinja2.TemplateError, match="without tool calls"):
        hf.apply_chat_template([U("a"), {"role": "tool", "content": "1", "tool_call_id": "abcdefghi"}])


def test_config_files_name_the_special_tokens_and_load_as_generation_config(folder):
    version, ours, folder_path, _ = folder
    config = json.loads((folder_path / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["unk_token"], config["add_bos_token"]) == (
        "<s>", "</s>", "<unk>", True)
    assert config["mistral_train_chat_format"] == version
    generation = transformers.GenerationConfig.from_pretrained(folder_path)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (ours.bos_id, ours.eos_id, None)


def _modes(folder) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")}


def test_a_training_runs_folders_are_complete_and_readable(tmp_path, tiny_base_folder):
    """final/ and a checkpoint (the LoRA adapter + tokenizer) and merged/ (full weights), written by fit()."""
    spec = TrainerSpec(objective="sft", max_steps=2, max_seq_len=64, batch_size=4, lr=2e-2, sample_max_new_tokens=2,
                       eval_max_new_tokens=0)
    with umask(0o022):
        run_dir = fit(RunConfig(model=ModelSpec(path=str(tiny_base_folder)), data=DataSpec(format="messages", eval_path=None),
                                trainer=spec, adapter=AdapterSpec(kind="lora", r=8, alpha=16, merge_at_end=True),
                                run=RunSpec(name="files", dir=str(tmp_path)),
                                tracking=TrackingSpec(progress_bar=False, plot=False)))
    ours = load_tokenizer(tiny_base_folder)
    chat = CHATS["multi-turn-system"]
    for name in ("final", "checkpoints/step_2", "merged"):
        folder = run_dir / name
        hf = transformers.AutoTokenizer.from_pretrained(folder)
        assert hf("Hello world").input_ids[0] == ours.bos_id == 1, name
        assert _ids(hf.apply_chat_template(chat, tokenize=True)) == ours.encode_chat(chat)[0], name
        assert transformers.GenerationConfig.from_pretrained(folder).eos_token_id == ours.eos_id, name
        modes = _modes(folder)
        assert any(n.endswith(".safetensors") for n in modes), name
        assert {n: m for n, m in modes.items() if m != 0o644 and not (folder / n).is_dir()} == {}, name
    assert stat.S_IMODE((run_dir / "merged").stat().st_mode) == 0o755


@pytest.mark.parametrize("mask,file_mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_a_saved_model_folder_follows_the_umask(tmp_path, mask, file_mode):
    """safetensors writes 0600 whatever the umask; the published folder follows the umask instead."""
    config = MistralConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2)
    with umask(mask):
        with atomic_directory(tmp_path / "model") as tmp:
            Mistral(config).save_pretrained(tmp)
            write_tokenizer_files(load_tokenizer(bundled_tokenizer_path("v1")), tmp)
    modes = _modes(tmp_path / "model")
    assert set(modes) >= {"model.safetensors", "config.json", "tokenizer.model", "tokenizer.json",
                          "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"}
    assert set(modes.values()) == {file_mode}
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o777 & ~mask
