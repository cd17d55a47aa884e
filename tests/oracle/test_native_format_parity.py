"""A native folder we write (`mistral-train export --format native`) gives the HF model's logits, read back by
our loader AND by an independent reader: a reference conversion written here from the published key mapping of
transformers' convert_mistral_weights_to_hf.py (regex key table, `permute_for_rope`, params.json -> config),
which never calls our code, into transformers' MistralForCausalLM. The prompt ids come from mistral-common
reading the folder's tokenizer file (a Tekken file, and a v3 SentencePiece one named tokenizer.model.v3).
A PEFT adapter (written by peft) is merged first, and the result gives the PEFT model's logits."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import peft
import pytest
import torch
import transformers
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from safetensors.torch import load_file

from mistral_train import Mistral
from mistral_train.cli import main
from tests.conftest import make_hf, tiny_kwargs
from tests.oracle.test_chat_formats_parity import DATA

FP32_TOL = 1e-5
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour, please."},
        {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "And another one?"}]
# (file shipped in mistral_common/data, the name an HF folder gives it, the file the native folder must hold)
TOKENIZERS = {"tekken": ("tekken_240911.json", "tekken.json", "tekken.json"),
              "sentencepiece-v3": ("mistral_instruct_tokenizer_240323.model.v3", "tokenizer.model", "tokenizer.model.v3")}

# --- the reference: transformers' published conversion (convert_mistral_weights_to_hf.py), re-typed -----------
KEY_MAP = [
    (r"^output\.weight$", r"lm_head.weight"),
    (r"^norm\.weight$", r"model.norm.weight"),
    (r"^tok_embeddings\.weight$", r"model.embed_tokens.weight"),
    (r"^layers\.(\d+)\.attention_norm\.weight$", r"model.layers.\1.input_layernorm.weight"),
    (r"^layers\.(\d+)\.ffn_norm\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"^layers\.(\d+)\.attention\.w(q|k|v|o)\.weight$", r"model.layers.\1.self_attn.\2_proj.weight"),
    (r"^layers\.(\d+)\.feed_forward\.w1\.weight$", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"^layers\.(\d+)\.feed_forward\.w2\.weight$", r"model.layers.\1.mlp.down_proj.weight"),
    (r"^layers\.(\d+)\.feed_forward\.w3\.weight$", r"model.layers.\1.mlp.up_proj.weight"),
]


def reference_key(key: str) -> str:
    for pattern, replacement in KEY_MAP:
        new, hits = re.subn(pattern, replacement, key)
        if hits:
            return new
    raise AssertionError(f"the published mapping has no rule for `{key}`")


def rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """permute_for_rope: each head's (head_dim/2, 2) pairs regrouped as (2, head_dim/2)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def reference_load(folder: Path) -> transformers.MistralForCausalLM:
    """params.json + consolidated.safetensors -> transformers, as the published script converts them (with the
    Ministral 3 script's `tied_embeddings` rule: the output head is the embedding)."""
    params = json.loads((folder / "params.json").read_text())
    config = transformers.MistralConfig(
        hidden_size=params["dim"], num_hidden_layers=params["n_layers"], intermediate_size=params["hidden_dim"],
        num_attention_heads=params["n_heads"], rms_norm_eps=params["norm_eps"], head_dim=params["head_dim"],
        vocab_size=params["vocab_size"], num_key_value_heads=params.get("n_kv_heads", params["n_heads"]),
        sliding_window=params.get("sliding_window"), rope_theta=params.get("rope_theta", 10000.0),
        max_position_embeddings=params.get("max_position_embeddings", 32768),
        tie_word_embeddings=params.get("tied_embeddings", False))
    state = {}
    for key, tensor in load_file(str(folder / "consolidated.safetensors")).items():
        new = reference_key(key)
        if new.endswith("q_proj.weight"):
            tensor = rope_rows(tensor, config.num_attention_heads)
        elif new.endswith("k_proj.weight"):
            tensor = rope_rows(tensor, config.num_key_value_heads)
        state[new] = tensor
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    config._attn_implementation = "sdpa"
    model = transformers.MistralForCausalLM(config)
    model.load_state_dict(state, strict=True)
    return model.eval()
# -----------------------------------------------------------------------------------------------------------------


def _hf_folder(tmp_path: Path, tokenizer: str, **overrides) -> tuple[transformers.MistralForCausalLM, Path]:
    """A tiny transformers model saved by transformers, with the tokenizer file beside it (as an HF folder holds it)."""
    shipped, name, _ = TOKENIZERS[tokenizer]
    vocab = 131072 if tokenizer == "tekken" else 32768
    model = make_hf(tiny_kwargs(vocab_size=vocab, head_dim=16, sliding_window=5, **overrides), seed=3)
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    shutil.copy(DATA / shipped, folder / name)
    return model, folder


def _prompt(native_folder: Path, tokenizer: str) -> torch.Tensor:
    """The chat as mistral-common encodes it from the native folder's own tokenizer file (longer than the window)."""
    official = MistralTokenizer.from_file(str(native_folder / TOKENIZERS[tokenizer][2]))
    ids = official.encode_chat_completion(ChatCompletionRequest.from_openai(messages=CHAT)).tokens
    assert len(ids) > 5
    return torch.tensor([ids])


def _assert_both_readers_match(native_folder: Path, tokenizer: str, expected_model) -> None:
    ids = _prompt(native_folder, tokenizer)
    with torch.no_grad():
        expected = expected_model(ids).logits
        ours = Mistral.from_pretrained(native_folder).eval()(ids)
        reference = reference_load(native_folder)(ids).logits
    torch.testing.assert_close(ours, expected, atol=FP32_TOL, rtol=FP32_TOL)
    torch.testing.assert_close(reference, expected, atol=FP32_TOL, rtol=FP32_TOL)


@pytest.mark.parametrize("tokenizer", list(TOKENIZERS))
@pytest.mark.parametrize("tied", [False, True])
def test_exported_native_folder_gives_the_hf_models_logits(tmp_path, tokenizer, tied):
    source, folder = _hf_folder(tmp_path, tokenizer, tie_word_embeddings=tied)
    assert main(["export", str(folder), "--format", "native", "--out", str(tmp_path / "native")]) == 0
    written = sorted(p.name for p in (tmp_path / "native").iterdir())
    assert written == sorted(["params.json", "consolidated.safetensors", TOKENIZERS[tokenizer][2]])
    _assert_both_readers_match(tmp_path / "native", tokenizer, source)


def test_exported_peft_adapter_is_merged_first(tmp_path):
    base, folder = _hf_folder(tmp_path, "sentencepiece-v3")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                           init_lora_weights=False)  # random B: the adapter changes the model
    torch.manual_seed(4)
    adapted = peft.get_peft_model(make_hf(tiny_kwargs(vocab_size=32768, head_dim=16, sliding_window=5), seed=3),
                                  lora).eval()
    adapted.save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": str(folder)}))
    assert main(["export", str(tmp_path / "adapter"), "--format", "native", "--out", str(tmp_path / "native")]) == 0
    ids = _prompt(tmp_path / "native", "sentencepiece-v3")
    with torch.no_grad():
        assert float((adapted(ids).logits - base(ids).logits).abs().max()) > 1e-2
    _assert_both_readers_match(tmp_path / "native", "sentencepiece-v3", adapted)
