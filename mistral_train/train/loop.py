"""fit(): the one training loop. Objectives differ only in their step function (steps.py).

One optimizer step = one accumulation window of `grad_accum_steps` micro-batches. The loss
of the window is the sum of its token losses divided by its label-token count, counted
before any backward pass, so k micro-batches of b rows give the gradient of one batch of
k*b rows whatever the number of label tokens in each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import shutil
import time
from pathlib import Path
from typing import Callable, ContextManager, Optional

import numpy as np
import torch

from mistral_train.checkpoint.atomic import atomic_directory
from mistral_train.checkpoint.state import (
    STATE_FILE, checkpoint_path, latest_checkpoint, load_training_state, prune_checkpoints, restore_rng_state,
    save_training_state,
)
from mistral_train.config import ModelSpec, RunConfig, dump_run_config
from mistral_train.data.text import build_text_batches
from mistral_train.generate import generate
from mistral_train.model import Mistral, MistralConfig
from mistral_train.plots import plot_run
from mistral_train.tokenizer import load_tokenizer, resolve_tokenizer_path
from mistral_train.tracking import MetricsLogger, progress_bar
from mistral_train.train.optim import build_optimizer, build_scheduler
from mistral_train.train.steps import Batch, Objective, get_objective

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Autocast = Callable[[], ContextManager]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is available (use auto or cpu)")
    return torch.device(name)


def autocast_for(precision: str, device: torch.device) -> Autocast:
    """A factory of the forward-pass context: nothing for fp32, bf16 autocast for bf16."""
    if precision == "fp32":
        return contextlib.nullcontext
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"trainer.precision must be 'fp32' or 'bf16', got {precision!r}")


def build_model(spec: ModelSpec, tokenizer) -> Mistral:
    """A fresh model of the spec's shape (vocabulary and BOS/EOS from the tokenizer), or the
    HF folder at `spec.path`."""
    if spec.dtype not in _DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {spec.dtype!r}")
    dtype = _DTYPES[spec.dtype]
    if spec.path:
        model = Mistral.from_pretrained(spec.path, dtype=dtype)
        if model.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"model.path {spec.path}: vocab_size {model.config.vocab_size} is smaller than the "
                f"tokenizer's ({tokenizer.vocab_size}); is model.tokenizer the model's tokenizer?"
            )
    else:
        fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "sliding_window", "rope_theta", "max_position_embeddings", "tie_word_embeddings",
                  "initializer_range")
        config = MistralConfig(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                               eos_token_id=tokenizer.eos_id, **{f: getattr(spec, f) for f in fields})
        model = Mistral(config).to(dtype)
    model.set_gradient_checkpointing(spec.gradient_checkpointing)
    return model


def backward_window(
    model: torch.nn.Module, objective: Objective, window: list[Batch], autocast: Autocast
) -> tuple[float, int]:
    """Accumulate the gradient of one window's token-normalised loss; return (loss, tokens)."""
    n_tokens = sum(objective.count(batch) for batch in window)
    if n_tokens == 0:
        raise ValueError("an accumulation window has no label tokens (every label is -100)")
    total = 0.0
    for batch in window:
        with autocast():
            loss_sum, _ = objective.step(model, batch)
        (loss_sum / n_tokens).backward()
        total += float(loss_sum.detach())
    return total / n_tokens, n_tokens


@torch.no_grad()
def evaluate_rows(model, objective: Objective, rows: torch.Tensor, batch_size: int, autocast: Autocast) -> float:
    """Mean token loss over held-out rows (M, T)."""
    device = next(model.parameters()).device
    was_training, total, count = model.training, 0.0, 0
    model.eval()
    for start in range(0, rows.shape[0], batch_size):
        ids = rows[start : start + batch_size].to(device)
        with autocast():
            loss_sum, n = objective.step(model, {"input_ids": ids, "labels": ids})
        total, count = total + float(loss_sum), count + int(n)
    model.train(was_training)
    return total / max(count, 1)


def resolve_resume(resume: Optional[str], run_dir: Path) -> Optional[Path]:
    """The checkpoint to continue from: `resume` is None, "true"/"latest" or a folder."""
    flag = str(resume).strip().lower() if resume is not None else "none"
    if flag in ("none", "", "false", "null"):
        existing = latest_checkpoint(run_dir)
        if existing is not None:
            raise FileExistsError(
                f"{run_dir} already holds checkpoints (newest: {existing.name}); pass resume=latest to "
                f"continue that run, or set run.name / run.dir to start a new one"
            )
        return None
    if flag in ("true", "latest"):
        found = latest_checkpoint(run_dir)
        if found is None:
            print(f"resume={resume}: no checkpoint in {run_dir / 'checkpoints'}; starting from step 0")
        return found
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"resume={resume!r}: not a checkpoint folder (no {STATE_FILE} in it)")
    return path


def copy_tokenizer(tokenizer, source: Path, folder: Path) -> None:
    """Put the tokenizer next to the weights so the folder is usable on its own: its file
    under the name `load_tokenizer` looks for, plus the special-token files of a source folder."""
    name = "tokenizer.model" if tokenizer.kind == "sentencepiece" else "tokenizer.json"
    shutil.copy2(tokenizer.path, folder / name)
    if source.is_dir():
        for extra in ("tokenizer_config.json", "special_tokens_map.json"):
            if (source / extra).is_file():
                shutil.copy2(source / extra, folder / extra)


def export_final(model: Mistral, tokenizer, tokenizer_source_path: Path, folder: Path) -> Path:
    """The final HF folder: weights, config.json and the tokenizer, appearing all at once."""
    with atomic_directory(folder) as tmp:
        model.save_pretrained(tmp)
        copy_tokenizer(tokenizer, tokenizer_source_path, tmp)
    return folder


def write_sample(model: Mistral, tokenizer, cfg: RunConfig, path: Path) -> str:
    """Greedy continuation of `trainer.sample_prompt`, printed and written to `path`.

    Runs in the weights' dtype, without autocast: the KV cache is allocated in that dtype."""
    prompt = tokenizer.encode(cfg.trainer.sample_prompt, bos=True)
    model.eval()
    ids = generate(model, prompt, cfg.trainer.sample_max_new_tokens, eos_token_id=tokenizer.eos_id)
    text = tokenizer.decode(ids[0].tolist())
    path.write_text(text + "\n", encoding="utf-8")
    print(f"\nsample> {text}\n")
    return text


def fit(cfg: RunConfig) -> Path:
    """Train as `cfg` says; return the run folder (config.yaml, metrics.jsonl, loss.png,
    checkpoints/, final/, sample.txt)."""
    spec = cfg.trainer
    if cfg.adapter.kind != "none":
        raise ValueError(f"adapter.kind={cfg.adapter.kind!r} is not available yet; use adapter=none")
    if cfg.data.format != "text":
        raise ValueError(f"data.format={cfg.data.format!r} is not available yet; expected 'text'")
    run_dir = Path(cfg.run.dir) / cfg.run.name
    resume_from = resolve_resume(cfg.resume, run_dir)
    seed_everything(spec.seed)
    device = resolve_device(spec.device)
    autocast = autocast_for(spec.precision, device)
    tokenizer_path = resolve_tokenizer_path(cfg.model.tokenizer, cfg.model.path)
    tokenizer = load_tokenizer(tokenizer_path)
    model = build_model(cfg.model, tokenizer).to(device)
    batches, eval_rows = build_text_batches(
        cfg.data.path, tokenizer, spec.max_seq_len, spec.batch_size, spec.seed, cfg.data.eval_fraction
    )
    objective = get_objective(spec.objective, spec.loss_chunk_size)
    optimizer = build_optimizer(model, spec)
    scheduler = build_scheduler(optimizer, spec)
    start = 0
    if resume_from is not None:
        state = load_training_state(resume_from, model, optimizer, scheduler)
        batches.load_state_dict(state["data"])
        restore_rng_state(state["rng"])
        start = state["step"]
        print(f"resumed from {resume_from} at step {start}")
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_run_config(cfg, run_dir / "config.yaml")
    logger = MetricsLogger(run_dir, cfg.tracking, config=dataclasses.asdict(cfg),
                           resume_step=start if resume_from is not None else None)
    bar = progress_bar(spec.max_steps, start, cfg.tracking.progress_bar)
    model.train()
    began = time.perf_counter()
    # tokens/s over training steps only: evaluation and checkpoint writes are not counted
    tokens_since, seconds_since, first_loss, last_loss = 0, 0.0, float("nan"), float("nan")
    for step in range(start, spec.max_steps):
        tick = time.perf_counter()
        window = [{k: v.to(device) for k, v in next(batches).items()} for _ in range(spec.grad_accum_steps)]
        last_loss, _ = backward_window(model, objective, window, autocast)
        first_loss = last_loss if step == start else first_loss
        # max_norm=inf still returns the norm (for the log) and leaves the gradient unchanged.
        max_norm = spec.grad_clip if spec.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        done, seconds = step + 1, time.perf_counter() - tick
        n_inputs = sum(batch["input_ids"].numel() for batch in window)
        tokens_since, seconds_since = tokens_since + n_inputs, seconds_since + seconds
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{n_inputs / seconds:.0f}")
        metrics = {"loss": last_loss, "lr": lr, "grad_norm": grad_norm}
        if eval_rows is not None and (done == spec.max_steps or (spec.eval_every and done % spec.eval_every == 0)):
            eval_batch = spec.batch_size * spec.grad_accum_steps
            metrics["eval_loss"] = evaluate_rows(model, objective, eval_rows, eval_batch, autocast)
        if done == 1 or done % spec.log_every == 0 or done == spec.max_steps or "eval_loss" in metrics:
            metrics["tokens_per_s"] = tokens_since / seconds_since
            logger.log(done, metrics)
            tokens_since, seconds_since = 0, 0.0
        if spec.save_every and (done % spec.save_every == 0 or done == spec.max_steps):
            save_training_state(checkpoint_path(run_dir, done), model, optimizer, scheduler, done, batches.state_dict())
            prune_checkpoints(run_dir, spec.keep_last)
    bar.close()
    logger.close()
    if spec.max_steps > start:
        print(f"trained steps {start + 1}-{spec.max_steps} in {time.perf_counter() - began:.0f}s; "
              f"loss {first_loss:.3f} -> {last_loss:.3f}")
    export_final(model, tokenizer, tokenizer_path, run_dir / "final")
    if cfg.tracking.plot:
        plot_run(run_dir)
    write_sample(model, tokenizer, cfg, run_dir / "sample.txt")
    return run_dir
