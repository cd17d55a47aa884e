"""Rollouts for GRPO/RLOO: `num_generations` sampled completions of each prompt of a batch, as the loss reads
them (completion ids right-padded, a mask through the EOS, truncated flags).

Our batched KV-cache `generate.generate` draws them by default; a live vLLM engine (`VLLMEngine`) can instead.
Completions of prompt i sit at rows i*G .. i*G+G-1 (G = num_generations), as trl repeats its prompts, so
`losses.group_advantages` reads consecutive groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Protocol

import torch

from mistral_train.generate import generate

if TYPE_CHECKING:  # vLLM is optional: the engine's module imports it only when an engine is built
    from mistral_train.rollout.vllm_engine import VLLMEngine


class GRPOSpec(Protocol):
    """The sampling settings a rollout reads (config.GRPOSpec has them; config sits above rollout/)."""

    num_generations: int
    max_completion_length: int
    temperature: float
    top_p: float
    top_k: Optional[int]


@dataclass
class Completions:
    """What one rollout produced, N = prompts * num_generations rows, C = the longest completion.

    ids: (N, C) long, right-padded with the pad id.
    mask: (N, C) long, 1 on completion tokens up to and including the first EOS.
    truncated: (N,) bool, True where no EOS came within max_completion_length.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    truncated: torch.Tensor


def completions_from_tokens(tokens: torch.Tensor, eos_token_id: int, pad_id: int) -> Completions:
    """Cut (N, C) generated tokens after each row's first EOS: mask through it, pad after it."""
    is_eos = tokens == eos_token_id
    # tokens strictly after the first EOS: the running count of EOS before this position is positive
    after_eos = (is_eos.long().cumsum(dim=-1) - is_eos.long()) > 0
    mask = (~after_eos).long()
    return Completions(ids=tokens.masked_fill(after_eos, pad_id), mask=mask, truncated=~is_eos.any(dim=-1))


def _from_engine(engine: "VLLMEngine", prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, spec: GRPOSpec,
                 eos_token_id: int, pad_id: int, generator: Optional[torch.Generator]) -> Completions:
    """The same rollout from vLLM: unpadded prompts in, unpadded continuations out, padded here."""
    prompts = [row[keep.bool()].tolist() for row, keep in zip(prompt_ids.cpu(), prompt_mask.cpu())]
    # One seed drawn from the caller's generator: row i samples with seed + i, so the rollout repeats
    # when the generator's state does (exact resume), and the rows of one group differ.
    seed = None if generator is None else int(torch.randint(2**31 - 1, (1,), generator=generator))
    out = engine.generate(prompts, spec.max_completion_length, temperature=spec.temperature, top_p=spec.top_p,
                          top_k=spec.top_k, eos_token_id=eos_token_id, seed=seed)
    continuations = [full[len(prompt):] for full, prompt in zip(out, prompts)]
    width = max((len(c) for c in continuations), default=0)
    tokens = torch.full((len(continuations), width), pad_id, dtype=torch.long)
    for row, continuation in enumerate(continuations):
        tokens[row, : len(continuation)] = torch.tensor(continuation, dtype=torch.long)
    completions = completions_from_tokens(tokens, eos_token_id, pad_id)
    # the padding appended here is not completion (a row that stopped at EOS already masks what follows)
    lengths = torch.tensor([len(c) for c in continuations])
    completions.mask &= (torch.arange(width)[None, :] < lengths[:, None]).long()
    device = prompt_ids.device
    return Completions(completions.ids.to(device), completions.mask.to(device), completions.truncated.to(device))


def generate_completions(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                         spec: GRPOSpec, eos_token_id: int, pad_id: int, generator: Optional[torch.Generator],
                         engine: Optional["VLLMEngine"] = None) -> Completions:
    """Sample `spec.num_generations` completions of every prompt with the current policy.

    Args:
        model: the policy (a causal-LM `Mistral`; LoRA or NF4 inside is fine). Generation runs in eval mode
            without gradients; the model's mode is restored. Unused when `engine` is given.
        prompt_ids: (P, T) long, left-padded. prompt_mask: (P, T), 1 on real tokens.
        spec: max_completion_length, temperature (0: greedy), top_p, top_k (None: no cut), num_generations.
        eos_token_id: a row stops after emitting it; it is kept and masked in.
        pad_id: what fills each row after its completion.
        generator: the sampling RNG (on the model's device); its state decides the rollout.
        engine: a `VLLMEngine` holding the current weights, to sample from instead of `model`.
    Returns:
        Completions with N = P * num_generations rows, prompt i's group at rows i*G .. i*G+G-1.
    """
    group = spec.num_generations
    ids = prompt_ids.repeat_interleave(group, dim=0)  # (N, T): each prompt's copies consecutive
    mask = prompt_mask.repeat_interleave(group, dim=0)
    if engine is not None:
        return _from_engine(engine, ids, mask, spec, eos_token_id, pad_id, generator)
    out = generate(model, ids, spec.max_completion_length, temperature=spec.temperature, top_k=spec.top_k,
                   top_p=spec.top_p, eos_token_id=eos_token_id, attention_mask=mask, generator=generator)
    return completions_from_tokens(out[:, ids.shape[1]:], eos_token_id, pad_id)
