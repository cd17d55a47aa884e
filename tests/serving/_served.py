"""Tiny models written with our public writers, our reference numbers, and vLLM's answers side by side."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Optional

import torch

from mistral_train import Mistral, MistralConfig
from mistral_train.generate import generate
from mistral_train.tokenizer.tokenizer import Tokenizer, bundled_tokenizer_path, load_tokenizer
from mistral_train.tokenizer.files import write_tokenizer_files
from tests._chat import A, S, U
from tests.conftest import randomize_

# Leading/trailing/double spaces, a newline, digits, and characters that need SentencePiece's byte fallback.
TEXTS = ["Once upon a time", " leading space", "two  spaces and\na newline 123", "café naïve 北京"]
CHATS = [[U("Hi there")], [S("Be brief."), U("Name a colour."), A("Blue."), U("And another?")]]
MAX_NEW = 8


def tiny_model(vocab_size: int, seed: int, task: str = "causal_lm", **overrides: Any) -> Mistral:
    """A tiny random Mistral with order-one weights (greedy picks are then far from ties).
    head_dim 64: vLLM's CPU attention has no kernel for the 16 of our usual tiny configs."""
    config = MistralConfig(**{**dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, sliding_window=None,
                                     tie_word_embeddings=False, max_position_embeddings=256), **overrides})
    torch.manual_seed(seed)
    return randomize_(Mistral(config, task=task), seed).eval()


def bundled(chat_format: str) -> Tokenizer:
    """The real Mistral tokenizer of a chat format, shipped in mistral-common."""
    return load_tokenizer(bundled_tokenizer_path(chat_format))


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
