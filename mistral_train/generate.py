"""Text generation with a pre-allocated KV cache (a rolling buffer when the model has a sliding window).

With `compile=True` the one-token decode step (blocks, head, cache writes) is compiled once
with torch.compile over a *static* cache: fixed shapes, the position as a tensor, attention over
every slot with empty ones masked, so one graph serves every step. The prompt's prefill, whose
length varies, runs eagerly; sampling stays eager too.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from mistral_train.model.kv_cache import KVCache
from mistral_train.model.mistral import Mistral


def load_for_generation(folder: Union[str, Path], base: Optional[str] = None) -> tuple[Mistral, list[Path]]:
    """The causal LM a folder holds, to generate with: an HF model folder, or a LoRA adapter folder applied
    (unmerged) to its base: `base`, else the base the adapter names (folders.adapter_base).

    Returns:
        (model in eval mode, the folders to take the tokenizer from, in order: the folder, then the base).
    Raises:
        ConfigError: neither a model nor an adapter folder, a classification model (no language-model head),
            or an adapter whose base is not here.
    """
    from mistral_train.adapters import load_adapter  # here: generation itself needs none of the folder machinery
    from mistral_train.errors import ConfigError
    from mistral_train.folders import (ADAPTER_CONFIG, MODEL_CONFIG, adapter_base, folder_task, is_adapter_folder,
                                       is_model_folder)

    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} does not exist; give an HF model folder or a LoRA adapter folder, "
                          "e.g. runs/NAME/final")
    adapter = is_adapter_folder(folder)
    if not adapter and not is_model_folder(folder):
        raise ConfigError(f"{folder} is not an HF model folder (no {MODEL_CONFIG}) nor a LoRA adapter folder "
                          f"(no {ADAPTER_CONFIG}); try runs/NAME/final")
    task = folder_task(folder)
    if task != "causal_lm":
        kind = "a reward model" if task == "sequence_classification" else "a token classifier"
        raise ConfigError(f"{folder} is {kind} ({task}): a classification model has no language-model head to "
                          "generate with; generate with a causal LM folder, e.g. the SFT or DPO run's final/")
    base_folder, note = adapter_base(folder, base) if adapter else (str(folder), {})
    model = Mistral.from_pretrained(base_folder, quantize=note.get("quantize"))
    if adapter:
        load_adapter(model, folder)
    return model.eval(), [folder, Path(base_folder)] if adapter else [folder]


def processed_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None
) -> torch.Tensor:
    """The fp32 logits (B, V) sampling draws from: divided by `temperature`, then cut to the `top_k` highest, then
    to the smallest set whose probability reaches `top_p` (cut tokens are -inf). Same order and boundaries as
    transformers' TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper (and vLLM's), so a sampled
    rollout draws from the distribution trl's would (tests/oracle/test_sampling_parity.py). None: no cut.
    At temperature 1 with no cut this is `logits` itself (fp32 input): treat it as read-only."""
    logits = logits.float() / temperature if temperature != 1.0 else logits.float()  # x / 1 is x exactly: skip a pass
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ascending, order = torch.sort(logits, dim=-1)
        # Drop a token when it and every less likely token together hold at most 1 - top_p; the likeliest stays.
        drop_sorted = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop_sorted[:, -1] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Pick the next token of each row from logits (B, V): greedy at temperature 0, else sampled from
    `processed_logits`.

    Returns:
        (B,) token ids.
    """
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    if top_p is None or top_p >= 1.0:
        probs = processed_logits(logits, temperature, top_k, None).softmax(dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
    return _sample_top_p(processed_logits(logits, temperature, top_k, None), top_p, generator)


def _sample_top_p(logits: torch.Tensor, top_p: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One draw per row from `processed_logits(..., top_p)` (whose cut this repeats on the same sorted values),
    by inverse CDF in the sorted order top_p already needs: one uniform per row instead of multinomial's
    scatter back to vocabulary order, second softmax and one exponential draw per vocabulary entry
    (most of sampling's cost at a 32000 vocabulary)."""
    ascending, order = torch.sort(logits, dim=-1)
    probs = ascending.softmax(dim=-1)
    drop = probs.cumsum(dim=-1) <= 1 - top_p
    drop[:, -1] = False
    # The kept tokens' probabilities, unnormalised: scaling u by their total draws from their renormalised
    # distribution (softmax of the cut logits) without a second softmax.
    cdf = probs.masked_fill_(drop, 0.0).cumsum(dim=-1)
    # cut tokens add 0, so no u lands on them; the likeliest (last) token is never cut,
    # so the clamp (u * total rounding up to total) lands on a kept token.
    u = torch.rand(logits.shape[0], 1, generator=generator, device=logits.device) * cdf[:, -1:]
    picked = torch.searchsorted(cdf, u, right=True).clamp_(max=logits.shape[-1] - 1)
    return order.gather(-1, picked).squeeze(-1)


def decode_step(model: Mistral, cache: KVCache, token: torch.Tensor, position: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Logits (B, V) after one new token per row: token and position (B, 1), index (1,) its cache index."""
    return model.lm_head(model.hidden_states(token, None, position, cache, index)[:, -1])


@lru_cache(maxsize=None)
def compiled_decode_step(mode: Optional[str] = None) -> Callable[..., torch.Tensor]:
    """`decode_step` compiled with torch.compile `mode` ("reduce-overhead" adds CUDA graphs on GPU).
    One function for all models: dynamo re-traces when a guard (model shape, batch, cache size) fails."""
    return torch.compile(decode_step, mode=mode)


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
    compile: bool = False,
    compile_mode: Optional[str] = None,
):
    """Continue each prompt by up to `max_new_tokens` tokens.

    Args:
        model: a causal-LM `Mistral`.
        input_ids: (B, T) prompts, left-padded when their lengths differ, or one list of ids.
        attention_mask: (B, T) 0 on left padding.
        eos_token_id: defaults to the model config's; a row that emits it stops, and is then
            filled with the pad id (EOS when the config has none). Generation ends when all rows stop.
        return_logits: also return the logits (B, V) each step chose from, in order.
        compile: run the decode step compiled (see the module docstring); the first call with a
            new model or batch shape pays the compile (seconds), later calls reuse it.
        compile_mode: torch.compile's `mode` for that step (None: inductor's default).
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
    cache = KVCache.for_model(model.config, B, T + max_new_tokens, dtype=dtype, device=device, static=compile)
    step_fn = compiled_decode_step(compile_mode) if compile else decode_step
    # RoPE positions count real tokens only, so a left-padded prompt is encoded as if unpadded.
    positions = (mask.long().cumsum(dim=-1) - 1).clamp(min=0)
    hidden = model.hidden_states(input_ids, mask, positions, cache, torch.arange(T, device=device))
    logits = model.lm_head(hidden[:, -1])  # (B, V)
    next_position = positions[:, -1:] + 1  # (B, 1)
    index = torch.tensor([T], device=device)
    tokens, step_logits = [], []
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        if return_logits:
            # A copy: under CUDA graphs the step's output buffer is overwritten by the next step.
            step_logits.append(logits.float().clone())
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
        logits = step_fn(model, cache, token[:, None], next_position, index)
        index, next_position = index + 1, next_position + 1
    model.train(was_training)
    out = torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1) if tokens else input_ids
    return (out, step_logits) if return_logits else out
