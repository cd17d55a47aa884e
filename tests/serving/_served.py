"""Tiny models written with our public writers, our reference numbers, and vLLM's answers side by side."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Optional

import torch

from mistral_train import Mistral, MistralConfig
from mistral_train.generate import generate
from mistral_train.tokenizer.tokenizer import Tokenizer, load_tokenizer
from mistral_train.tokenizer.files import write_tokenizer_files
from tests._chat import A, S, U
from tests._tokenizers import bundled  # noqa: F401  (the serving tests import it from here)
from tests.conftest import randomize_
# the oracle's tokenizer copies (a Tekken file set to a version, with the special tokens v11+ need) and its tool use
from tests.oracle.test_chat_formats_parity import CALLS, RESULTS, TOOLS, _copy

# Leading/trailing/double spaces, a newline, digits, characters that need SentencePiece's byte fallback, and
# what Tekken's split regex decides (contractions, digit runs, mixed case, emoji; transformers' "fix_mistral_regex").
TEXTS = ["Once upon a time", " leading space", "two  spaces and\na newline 123", "café naïve 北京",
         "It's 12345 O'Neil's eBay 🎉 안녕"]
CHATS = [[U("Hi there")], [S("Be brief."), U("Name a colour."), A("Blue."), U("And another?")]]
MAX_NEW = 8

# Every chat format we support, each served from the tokenizer file it comes with: (file in mistral_common/data,
# chat format). Tekken copies carry the version in config.version (and v11+ mistral-common's special tokens).
FORMATS = {"v1": ("tokenizer.model.v1", "v1"), "v2": ("mistral_instruct_tokenizer_240216.model.v2", "v2"),
           "v3": ("mistral_instruct_tokenizer_240323.model.v3", "v3"),
           "v7": ("mistral_instruct_tokenizer_241114.model.v7", "v7"),
           **{f"tekken-{v}": ("tekken_240911.json", v) for v in ("v3", "v7", "v11", "v13", "v15")}}


def format_tokenizer(case: str, folder: Path) -> tuple[Tokenizer, str]:
    """(our tokenizer, chat format) of a FORMATS case, its file copied into `folder`."""
    name, version = FORMATS[case]
    return load_tokenizer(_copy(name, version, folder)), version


def tool_chats(version: str) -> list[list[dict]]:
    """Prompts with tool use that `version` accepts (v2: one call per turn; v7+: text beside the calls): tool
    definitions only, a prompt ending with tool results, and a later user turn after calls, results and an answer."""
    v = int(version[1:])
    calls, results = (CALLS, RESULTS) if v > 2 else ({**CALLS, "tool_calls": CALLS["tool_calls"][:1]}, RESULTS[1:])
    chats = [[U("Weather in Paris?")], [S("Use tools."), U("Weather and sum?"), calls, *results],
             [S("Use tools."), U("Weather and sum?"), calls, *results, A("21 and 3."), U("Thanks. And in Rome?")]]
    if v >= 7:
        chats.append([U("Go."), {**calls, "content": "Let me check."}, *results, A("Done."), U("Again?")])
    return chats


def reasoning_chat(key: str = "reasoning") -> list[dict]:
    """A v13+ prompt whose earlier answer carries its reasoning under `key` (ours reads `reasoning_content` or
    `reasoning`; vLLM's LLM.chat passes on only `reasoning`, as both keys)."""
    return [U("2+2?"), {"role": "assistant", key: "Add them.", "content": "4"}, U("And 3+3?")]


def tiny_model(vocab_size: int, seed: int, task: str = "causal_lm", **overrides: Any) -> Mistral:
    """A tiny random Mistral with order-one weights (greedy picks are then far from ties).
    head_dim 64: vLLM's CPU attention has no kernel for the 16 of our usual tiny configs."""
    config = MistralConfig(**{**dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, sliding_window=None,
                                     tie_word_embeddings=False, max_position_embeddings=256), **overrides})
    torch.manual_seed(seed)
    return randomize_(Mistral(config, task=task), seed).eval()


def write_full_folder(model: Mistral, tokenizer: Tokenizer, folder: Path, chat_format: str) -> Path:
    """What the loop writes into final/ for a full fine-tune (train/loop.py write_folder)."""
    folder.mkdir(parents=True)
    model.save_pretrained(folder)
    write_tokenizer_files(tokenizer, folder, chat_format)
    return folder


@torch.no_grad()
def our_prompt_logprobs(model: Mistral, ids: list[int]) -> torch.Tensor:
    """(T - 1,) log p(ids[t] | ids[:t]) for t >= 1, in fp32."""
    logits = model(torch.tensor([ids])).float()[0]  # (T, V)
    return logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def our_greedy(model: Mistral, ids: list[int], eos_token_id: int, max_new: int = MAX_NEW) -> list[int]:
    """Our greedy continuation, EOS kept when reached (generate's convention)."""
    return generate(model, ids, max_new, eos_token_id=eos_token_id)[0, len(ids):].tolist()


def vllm_prompt_logprobs(output: Any) -> torch.Tensor:
    """(T - 1,) the log-prob vLLM gives each prompt token after the first (SamplingParams(prompt_logprobs=0))."""
    return torch.tensor([entry[tok].logprob for entry, tok in zip(output.prompt_logprobs[1:], output.prompt_token_ids[1:])])


def scoring_params(max_new: int = MAX_NEW) -> Any:
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_new, temperature=0.0, prompt_logprobs=0)


def start_engine(folder: Path, dtype: str = "float32", **kwargs: Any) -> Any:
    from vllm import LLM

    return LLM(model=str(folder), dtype=dtype, enforce_eager=not torch.cuda.is_available(), max_model_len=256,
               seed=0, **kwargs)


def close_engine(llm: Optional[Any]) -> None:
    """Free the engine (its KV cache) before the next module's engine starts."""
    del llm
    gc.collect()


def first_difference(ours: list[int], theirs: list[int]) -> str:
    """Where two id lists part, for a failure message that says which ids differ."""
    i = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return f"first difference at {i}: ours {ours[i:i + 4]} vs vLLM {theirs[i:i + 4]} (ours {ours}, vLLM {theirs})"
