"""Text generation with a pre-allocated KV cache (a rolling buffer when the model has a sliding window)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from mistral_train.model.kv_cache import KVCache
from mistral_train.model.mistral import Mistral


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Pick the next token of each row from logits (B, V): greedy at temperature 0, else sampled.

    Returns:
        (B,) token ids.
    """
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already cover top_p; the first always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Mistral,
    input_ids: Union[torch.Tensor, Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_token_id: Optional[int] = None,
    attention_mask: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    stop_at_eos: bool = True,
    return_logits: bool = False,
):
    """Continue each prompt by up to `max_new_tokens` tokens.

    Args:
        model: a causal-LM `Mistral`.
        input_ids: (B, T) prompts, left-padded when their lengths differ, or one list of ids.
        attention_mask: (B, T) 0 on left padding.
        eos_token_id: defaults to the model config's; a row that emits it stops, and is then
            filled with the pad id (EOS when the config has none). Generation ends when all rows stop.
        return_logits: also return the logits (B, V) each step chose from, in order.
    Returns:
        (B, T + n) token ids with n <= max_new_tokens; with `return_logits`, (ids, [logits...]).
    """
    if model.task != "causal_lm":
        raise ValueError(f"generate needs a causal-LM model, got a {model.task} model")
    device = next(model.parameters()).device
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.tensor([list(input_ids)], dtype=torch.long)
    input_ids = input_ids.to(device)
    B, T = input_ids.shape
    mask = attention_mask.to(device).bool() if attention_mask is not None else torch.ones(B, T, dtype=torch.bool, device=device)
    if bool((mask[:, 1:].int() < mask[:, :-1].int()).any()):
        raise ValueError("generate expects left padding: attention_mask must not go from 1 back to 0 within a row")
    limit = model.config.max_position_embeddings
    if T + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the model's max_position_embeddings ({limit})"
        )
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else eos

    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    cache = KVCache.for_model(model.config, B, T + max_new_tokens, dtype=dtype, device=device)
    # RoPE positions count real tokens only, so a left-padded prompt is encoded as if unpadded.
    positions = (mask.long().cumsum(dim=-1) - 1).clamp(min=0)
    hidden = model.hidden_states(input_ids, mask, positions, cache, torch.arange(T, device=device))
    next_position = positions[:, -1] + 1
    tokens, step_logits = [], []
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        logits = model.lm_head(hidden[:, -1])  # (B, V)
        if return_logits:
            step_logits.append(logits.float())
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if pad is not None:
            token = torch.where(finished, torch.full_like(token, pad), token)
        tokens.append(token)
        if stop_at_eos and eos is not None:
            finished |= token == eos
            if bool(finished.all()):
                break
        if step == max_new_tokens - 1:
            break
        index = torch.tensor([T + step], device=device)
        hidden = model.hidden_states(token[:, None], None, next_position[:, None], cache, index)
        next_position = next_position + 1
    model.train(was_training)
    out = torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1) if tokens else input_ids
    return (out, step_logits) if return_logits else out
