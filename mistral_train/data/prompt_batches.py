"""Prompts as fit()'s batches for online RL (grpo, rloo): canonical prompt rows -> generation prompts -> EpochBatches.

A micro-batch trains on `trainer.batch_size` completions, `group_size` (trainer.grpo.num_generations) per
prompt, so it draws batch_size // group_size prompts; a batch size that is no multiple of the group size is
refused. A prompt batch is
    {"prompt_ids": (P, T) long, left-padded with the pad id (every prompt ends at column T - 1, where
                   generation continues),
     "prompt_mask": (P, T) long, 1 on real tokens,
     "row_index": (P,) long, each prompt's index into `TrainData.prompt_rows` (the canonical training rows,
                  whose "fields" reward functions read)}.
Each prompt is the chat template's generation prompt of its turns (what exact match prompts the model with:
`Tokenizer.apply_chat_template(..., add_generation_prompt=True)`, tools included).

A prompt longer than max_seq_len is an error naming its row: prompts are never cut, because cutting a chat
prompt from either end loses its instruction or its question, and the completions would answer another one.

Positions, epochs and resume are EpochBatches' (data/epochs.py), counted in prompts. Held-out prompt rows with
an "answer" become `eval_rows` for exact match (their turns are the prompt); there is no held-out loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from mistral_train.data.collate import Batch
from mistral_train.data.epochs import EpochBatches, TrainData, answered_rows
from mistral_train.data.sources import RowSource
from mistral_train.data.spec import Batching, DataSpec
from mistral_train.errors import ConfigError
from mistral_train.wording import counted


@dataclass(frozen=True)
class Prompt:
    """One training prompt: its generation-prompt ids and its row's index in `TrainData.prompt_rows`."""

    ids: list[int]
    index: int


def prompts_per_batch(b: Batching) -> int:
    """P = batch_size // group_size; ConfigError naming both settings when they do not divide."""
    if b.group_size < 1:
        raise ConfigError(f"trainer.grpo.num_generations={b.group_size}: expected at least 1 completion per prompt")
    if b.batch_size % b.group_size:
        nearest = b.group_size * max(1, b.batch_size // b.group_size)
        raise ConfigError(f"trainer.batch_size={b.batch_size} must be a multiple of trainer.grpo.num_generations="
                          f"{b.group_size}: a micro-batch holds batch_size completions, num_generations per prompt "
                          f"(e.g. trainer.batch_size={nearest})")
    return b.batch_size // b.group_size


def prompt_data(spec: DataSpec, b: Batching, tokenizer, train: RowSource, held: Optional[RowSource]) -> TrainData:
    """Encode and batch canonical prompt rows (see the module docstring).

    Raises:
        ConfigError: trainer.batch_size is no multiple of the group size.
        ValueError: streaming (prompts are read whole: row_index points into them), a prompt the chat
            template refuses, or one longer than max_seq_len (naming the row).
    """
    if spec.streaming:
        raise ValueError("data.streaming=true with prompts: prompts are read whole (each batch's row_index points "
                         "into the rows, for the reward functions); set data.streaming=false")
    per_batch = prompts_per_batch(b)
    rows = list(train)
    prompts = [Prompt(encode_prompt(row, tokenizer, spec.chat_format, b.max_seq_len), i) for i, row in enumerate(rows)]
    tokens = sum(len(p.ids) for p in prompts)
    batches = EpochBatches(prompts, lambda items: collate_prompts(items, b.pad_id), per_batch, b.seed, tokens,
                           train.name, unit="prompt")
    longest = max(len(p.ids) for p in prompts)
    summary = [train.describe(),
               f"{counted(len(prompts), 'prompt')} of at most {longest} tokens, {per_batch} per batch "
               f"(trainer.batch_size={b.batch_size} completions, {b.group_size} per prompt; {batches.per_epoch()})"]
    short = _too_few(train.name, len(prompts), b)
    if held is None:
        return TrainData(batches, None, b.eval_size, summary=summary, too_few=short, prompt_rows=rows)
    eval_rows = list(held)
    for row in eval_rows:  # a held-out prompt the template refuses stops the run now, not at the first eval
        encode_prompt(row, tokenizer, spec.chat_format, b.max_seq_len)
    # exact match reads chat rows: the prompt's turns are the conversation it replies to
    answered = answered_rows(eval_rows)
    summary.append(f"{held.name}: {counted(len(eval_rows), 'held-out prompt')}, "
                   f"{len(answered or [])} with an answer (exact match)")
    return TrainData(batches, None, b.eval_size, eval_rows=answered, summary=summary, too_few=short, prompt_rows=rows)


def encode_prompt(row: dict[str, Any], tokenizer, chat_format: Optional[str], max_seq_len: int) -> list[int]:
    """The ids of a canonical prompt row's generation prompt; ValueError naming the row when the template refuses
    it or it is longer than max_seq_len."""
    where = f"{row['source']} row {row['row']}"
    try:
        ids = tokenizer.apply_chat_template(row["prompt"], chat_format, add_generation_prompt=True,
                                            tools=row.get("tools"))
    except ValueError as err:
        raise ValueError(f"{where}: cannot build the prompt ({err})") from None
    if len(ids) > max_seq_len:
        raise ValueError(f"{where}: the prompt is {len(ids)} tokens, longer than trainer.max_seq_len={max_seq_len}; "
                         "prompts are never cut (the completion would answer another question): raise "
                         "trainer.max_seq_len or remove the row")
    return ids


def collate_prompts(prompts: list[Prompt], pad_id: int) -> Batch:
    """{"prompt_ids", "prompt_mask", "row_index"} of a batch of prompts (module docstring)."""
    ids, mask = left_pad([p.ids for p in prompts], pad_id)
    return {"prompt_ids": ids, "prompt_mask": mask, "row_index": torch.tensor([p.index for p in prompts])}


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (B, T_max) long, padded on the left so every prompt ends at T_max - 1."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, length - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[i, length - len(prompt):] = 1
    return ids, mask


def _too_few(name: str, n_prompts: int, b: Batching) -> Optional[str]:
    """The small-data message in prompts (the unit a batch draws), else None (epochs.too_few counts a batch
    in the items it draws, which here are not the completions trainer.batch_size counts)."""
    per_batch = b.batch_size // b.group_size
    if n_prompts >= per_batch:
        return None
    return (f"{name}: {counted(n_prompts, 'prompt')}, fewer than the {per_batch} prompts of one batch "
            f"(trainer.batch_size={b.batch_size} completions / trainer.grpo.num_generations={b.group_size}); "
            f"lower trainer.batch_size to {n_prompts * b.group_size}, lower trainer.grpo.num_generations or add "
            "prompts")
