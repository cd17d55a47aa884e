"""vLLM serves a native folder we write (`mistral-train export --format native`: params.json +
consolidated.safetensors + tekken.json / tokenizer.model.vN) in its mistral mode (config_format, load_format and
tokenizer_mode "mistral": vLLM's own params.json reader, key map and rotary permutation, and mistral-common's
tokenizer) exactly as our model: chat prompt ids equal our encode_chat, prompt log-probs within 1e-5 (fp32) and
greedy tokens equal; for a Tekken file and a v3 SentencePiece one, untied and tied heads, every layer sliding
over a window shorter than the prompts, full attention, and Ministral's interleaved full and sliding layers."""

from __future__ import annotations

import types

import pytest
from vllm.inputs import TokensPrompt

from mistral_train import Mistral
from mistral_train.cli import main
from tests.serving._served import (CHATS, close_engine, first_difference, format_tokenizer, our_greedy,
                                   our_prompt_logprobs, scoring_params, start_engine, tiny_model, vllm_prompt_logprobs,
                                   write_full_folder)

FP32_TOL = 1e-5
# FORMATS case of _served.py, and the model's config overrides
CASES = {"tekken-v7": ("tekken-v7", dict(tie_word_embeddings=False, sliding_window=None)),
         "sentencepiece-v3": ("v3", dict(tie_word_embeddings=True, sliding_window=8)),
         # Ministral: full and sliding layers interleaved, written as a per-layer window list
         "ministral-interleaved": ("tekken-v3", dict(model_type="ministral", num_hidden_layers=4, sliding_window=6,
                                                     layer_types=["sliding_attention", "full_attention"] * 2)),
         # Ministral 3: YaRN with its default magnitude correction, queries scaled by position past 8 tokens
         "ministral3-yarn": ("tekken-v7", dict(model_type="ministral3", rope_type="yarn", query_scaling="llama4",
                                               rope_theta=1e6, sliding_window=None, tie_word_embeddings=True,
                                               rope_options=dict(factor=4.0, original_max_position_embeddings=8,
                                                                 beta_fast=32.0, beta_slow=1.0,
                                                                 llama_4_scaling_beta=0.5)))}


@pytest.fixture(scope="module", params=list(CASES))
def served(request, tmp_path_factory):
    case, overrides = CASES[request.param]
    root = tmp_path_factory.mktemp(f"native_{request.param}")
    tokenizer, fmt = format_tokenizer(case, root)
    model = tiny_model(tokenizer.vocab_size, seed=11, **overrides)
    final = write_full_folder(model, tokenizer, root / "final", fmt)  # what a full fine-tune's run leaves
    assert main(["export", str(final), "--format", "native", "--out", str(root / "native")]) == 0
    assert not (root / "native" / "config.json").exists()  # vLLM reads params.json, nothing else
    llm = start_engine(root / "native", config_format="mistral", load_format="mistral", tokenizer_mode="mistral")
    yield types.SimpleNamespace(model=model, tokenizer=tokenizer, fmt=fmt, llm=llm, window=overrides["sliding_window"],
                                folder=root / "native")
    close_engine(llm)


def test_vllm_reads_the_native_config(served):
    config = served.llm.llm_engine.model_config.hf_config
    assert type(served.llm.get_tokenizer()).__name__ == "MistralTokenizer"  # mistral-common, from the native file
    assert config.head_dim == 64 and config.num_key_value_heads == 1
    assert config.tie_word_embeddings is served.model.config.tie_word_embeddings
    assert getattr(config, "sliding_window", None) == served.window  # no key: full attention
    kinds = [("full_attention" if served.model.config.layer_window(i) is None else "sliding_attention")
             for i in range(served.model.config.num_hidden_layers)]
    assert getattr(config, "layer_types", None) == (None if served.window is None else kinds)
    # and our own loader reads the folder vLLM served into the same model
    back = Mistral.from_pretrained(served.folder)
    assert all(back.state_dict()[k].equal(v) for k, v in served.model.state_dict().items())


def test_chat_prompts_logprobs_and_greedy_tokens_equal_ours(served):
    outputs = served.llm.chat(CHATS, scoring_params(), use_tqdm=False)
    if served.window is not None:  # the window cuts attention in the longer prompt
        assert max(len(out.prompt_token_ids) for out in outputs) > served.window
    for out, chat in zip(outputs, CHATS, strict=True):
        ids = served.tokenizer.apply_chat_template(chat, served.fmt, add_generation_prompt=True)
        assert list(out.prompt_token_ids) == ids, first_difference(ids, list(out.prompt_token_ids))
        diff = float((vllm_prompt_logprobs(out) - our_prompt_logprobs(served.model, ids)).abs().max())
        assert diff <= FP32_TOL, f"max |log-prob difference| {diff:.2e}"
        assert list(out.outputs[0].token_ids) == our_greedy(served.model, ids, served.tokenizer.eos_id)


def test_id_prompts_longer_than_the_window(served):
    ids = [served.tokenizer.bos_id] + served.tokenizer.encode("a longer prompt: one two three four five six seven "
                                                              "eight nine ten eleven twelve")
    out = served.llm.generate([TokensPrompt(prompt_token_ids=ids)], scoring_params(), use_tqdm=False)[0]
    diff = float((vllm_prompt_logprobs(out) - our_prompt_logprobs(served.model, ids)).abs().max())
    assert diff <= FP32_TOL, f"max |log-prob difference| {diff:.2e}"
    assert list(out.outputs[0].token_ids) == our_greedy(served.model, ids, served.tokenizer.eos_id)
