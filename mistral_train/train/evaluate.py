"""Held-out evaluation: token-weighted loss and perplexity, and greedy exact match on chat rows
whose reply can be checked: rows with an "answer" field (as the bundled tiny_chat_eval.jsonl), or rows
whose last message is an assistant tool call (as tiny_tools_eval.jsonl).

Exact match compares normalised strings (see `normalize_answer`): the prediction is the greedy
continuation of the prompt up to EOS (or `max_new_tokens`), decoded without special tokens. A tool-call
row matches when the continuation parses (tokenizer/tool_calls.parse_answer) into the same calls, each
the same name with the same arguments (as JSON values); the ids are not compared.
"""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any, Callable, ContextManager, Iterable, Optional, Sequence

import torch

from mistral_train.data.prompt_batches import left_pad
from mistral_train.generate import generate
from mistral_train.rollout.reward_builtins import normalize_answer  # one normalisation: exact match and the reward
from mistral_train.tokenizer.chat_messages import call_arguments
from mistral_train.tokenizer.tool_calls import ToolCallError, parse_answer

Batch = dict[str, torch.Tensor]
StepFn = Callable[[torch.nn.Module, Batch], Any]  # -> train/steps.StepOutput


def evaluate_loss(
    model: torch.nn.Module,
    step_fn: StepFn,
    batches: Iterable[Batch],
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    reduce_sum: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    perplexity: bool = True,
) -> dict[str, float]:
    """Unit-weighted loss over every held-out batch: sum of unit losses / number of units (label
    tokens, or pairs), not a mean of per-batch means, which would over-weight small batches.

    Args:
        model: evaluated in eval mode under no_grad; its training mode is restored afterwards.
        step_fn: (model, batch) -> StepOutput (summed loss, units, summed stats), e.g. `pretrain_step`.
        batches: dicts of tensors such as input_ids/labels (B, T); moved to the model's device.
        autocast: factory of the forward-pass context (bf16 autocast or nothing).
        reduce_sum: sums a float64 tensor [loss, units, stats...] over processes (e.g.
            `accelerator.reduce(t, "sum")`) when each process evaluates its own share.
        perplexity: add eval_ppl = exp(eval_loss) (language-modelling objectives).
    Returns:
        {"eval_loss": loss per unit, "eval_ppl": exp(eval_loss) (inf on overflow), "eval_" + each stat}.
    """
    device = next(model.parameters()).device
    was_training = model.training
    sums: dict[str, torch.Tensor] = {}
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_units = torch.zeros((), dtype=torch.float64, device=device)
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                with autocast():
                    out = step_fn(model, batch)
                loss_sum += out.loss_sum.detach().double()
                n_units += float(out.n_units)
                for key, value in (out.stats or {}).items():
                    sums[key] = sums.get(key, 0.0) + torch.as_tensor(value, device=device).double()
    finally:
        model.train(was_training)
    totals = torch.stack([loss_sum, n_units, *sums.values()])
    if reduce_sum is not None:
        totals = reduce_sum(totals)
    loss_total, units, *stat_totals = totals.tolist()
    if units == 0:
        raise ValueError("evaluation found no label tokens: the held-out batches are empty or every label is -100")
    loss = loss_total / units
    metrics = {"eval_loss": loss}
    if perplexity:
        metrics["eval_ppl"] = math.exp(loss) if loss < 700 else float("inf")
    return {**metrics, **{f"eval_{key}": value / units for key, value in zip(sums, stat_totals)}}


def prompt_messages(messages: Sequence[dict]) -> list[dict]:
    """The conversation up to its final assistant turn (that turn removed: the reply to predict)."""
    messages = list(messages)
    return messages[:-1] if messages and messages[-1].get("role") == "assistant" else messages


def _where(row: dict, index: int) -> str:
    return f"{row['source']} row {row['row']}" if "source" in row and "row" in row else f"eval row {index}"


def expected_calls(row: dict) -> Optional[list[tuple[str, Any]]]:
    """[(name, arguments)] of the row's last message when it is an assistant tool call, else None."""
    last = (row.get("messages") or [{}])[-1]
    if last.get("role") != "assistant" or not last.get("tool_calls"):
        return None
    return [_name_args(call) for call in last["tool_calls"]]


def _name_args(call: dict) -> tuple[str, Any]:
    return call["function"]["name"], call_arguments(call["function"].get("arguments"))


def checkable(row: dict) -> bool:
    """Whether exact match can score `row`: it has an "answer", or its last message is a tool call."""
    return "answer" in row or expected_calls(row) is not None


def _checked(rows: Iterable[dict]) -> list[dict]:
    """The rows with an answer (or an expected tool call); every row needs one unless none has (then:
    nothing to score)."""
    rows = list(rows)
    if not any(checkable(row) for row in rows):
        return []
    for index, row in enumerate(rows):
        where = _where(row, index)
        if not checkable(row):
            raise ValueError(f"{where}: no 'answer' field (nor a final tool call), but other held-out rows have one; "
                             "exact match needs an answer on every held-out row (or on none)")
        if "answer" in row and not isinstance(row["answer"], str):
            raise ValueError(f"{where}: 'answer' must be a string, got {type(row['answer']).__name__}")
        if "messages" not in row:
            raise ValueError(f"{where}: has an 'answer' but no chat messages; exact match needs chat rows")
    return rows


def exact_match(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Iterable[dict],
    chat_format: Optional[str] = None,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    n_samples: int = 3,
) -> dict[str, Any]:
    """Greedy-decode a reply to each held-out chat row and compare it with the row's "answer".

    Args:
        model: a causal-LM `Mistral` (the unwrapped model under Accelerate); run as `generate` does
            (eval mode, weights' dtype), its training mode restored afterwards.
        tokenizer: a `mistral_train.tokenizer.Tokenizer`.
        rows: canonical rows ({"messages": [...], "answer": str, "source", "row"}). Every row needs
            an answer, unless none has one: then nothing is scored and n is 0.
        chat_format: v1 | v2 | v3 | None (the tokenizer's own), as in training.
        batch_size: prompts generated together, left-padded (same result as one by one).
        n_samples: how many (prompt, answer, prediction) samples to keep for the log.
    Returns:
        {"exact_match": share of rows matched (nan when n is 0), "n": rows scored,
         "samples": the first n_samples as dicts of prompt/answer/prediction text and "correct"}.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    rows = _checked(rows)
    if not rows:
        return {"exact_match": float("nan"), "n": 0, "samples": []}
    prompts = []
    for index, row in enumerate(rows):
        try:
            prompts.append(tokenizer.apply_chat_template(prompt_messages(row["messages"]), chat_format,
                                                         add_generation_prompt=True, tools=row.get("tools")))
        except ValueError as err:
            raise ValueError(f"{_where(row, index)}: cannot build the prompt ({err})") from None
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id  # masked out anyway
    device = next(model.parameters()).device
    correct, samples = 0, []
    for start in range(0, len(rows), batch_size):
        chunk = prompts[start:start + batch_size]
        ids, mask = left_pad(chunk, pad_id)
        out = generate(model, ids.to(device), max_new_tokens, attention_mask=mask.to(device),
                       eos_token_id=tokenizer.eos_id)
        for offset, new in enumerate(out[:, ids.shape[1]:].tolist()):
            if tokenizer.eos_id in new:
                new = new[:new.index(tokenizer.eos_id)]
            row, calls = rows[start + offset], expected_calls(rows[start + offset])
            if calls is None:
                prediction, answer = tokenizer.decode(new).strip(), row["answer"]
                hit = normalize_answer(prediction) == normalize_answer(answer)
            else:
                prediction, answer = tokenizer.decode(new, skip_special=False).strip(), json.dumps(calls)
                hit = _predicted_calls(tokenizer, new, chat_format) == calls
            correct += hit
            if len(samples) < n_samples:
                samples.append({"prompt": tokenizer.decode(chunk[offset], skip_special=False),
                                "answer": answer, "prediction": prediction, "correct": hit})
    return {"exact_match": correct / len(rows), "n": len(rows), "samples": samples}


def _predicted_calls(tokenizer: Any, ids: list[int], chat_format: Optional[str]) -> Optional[list[tuple[str, Any]]]:
    """[(name, arguments)] of the calls a generated answer makes; None when it makes none or they do not parse."""
    try:
        message = parse_answer(tokenizer, ids, chat_format)
    except ToolCallError:
        return None
    return [_name_args(call) for call in message.get("tool_calls", [])] or None
