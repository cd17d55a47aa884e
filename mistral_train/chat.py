"""One chat turn with tools: messages (+ tool definitions) -> the model's answer as an OpenAI-form
assistant message, its tool calls parsed (tokenizer/tool_calls.py).

To answer a call, append the returned message and one `{"role": "tool", "tool_call_id": call["id"],
"name": ..., "content": ...}` per call, and call `chat` again: the conversation then ends with tool
results, which the chat formats take as the prompt of the next answer.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from mistral_train.generate import generate
from mistral_train.model.mistral import Mistral
from mistral_train.tokenizer.tokenizer import Tokenizer
from mistral_train.tokenizer.tool_calls import parse_answer


def chat_prompt(tokenizer: Tokenizer, messages: Sequence[dict], tools: Optional[list] = None) -> list[int]:
    """Prompt ids of a conversation that ends with a user message or tool results."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools)


def chat(model: Mistral, tokenizer: Tokenizer, messages: Sequence[dict], tools: Optional[list] = None,
         max_new_tokens: int = 256, **sampling: Any) -> dict:
    """The model's next assistant message for `messages`: `{"role": "assistant", "content", "tool_calls"?,
    "reasoning_content"?}` (see tool_calls.parse_answer). `sampling`: generate's temperature, top_k,
    top_p, generator."""
    prompt = chat_prompt(tokenizer, messages, tools)
    device = next(model.parameters()).device
    ids = generate(model, torch.tensor([prompt], device=device), max_new_tokens, eos_token_id=tokenizer.eos_id,
                   **sampling)
    return parse_answer(tokenizer, ids[0, len(prompt):].tolist())
