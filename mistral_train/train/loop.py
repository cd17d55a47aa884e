"""fit(): the one training loop, run through Accelerate (also for a single process).

Objectives differ only in their step function (steps.py), data only in their batches
(data/batches.py). One optimizer step = one accumulation window of `grad_accum_steps`
micro-batches on each of the P processes. The window's loss is the sum of its token losses
divided by its label-token count over all P * grad_accum_steps micro-batches, counted before any
backward pass, so k micro-batches of b rows give the gradient of one batch of k*b rows whatever
the number of label tokens in each. Every process reads the same batch sequence and takes every
P-th batch, so each knows the whole window's count without communicating; each scales its loss
by P because DDP averages the P gradients. Accelerate's own gradient accumulation is not used.

Stable entry points (tests and tools call them): fit, build_model, backward_window, next_window,
evaluate, seed_everything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from pathlib import Path
from typing import Callable, ContextManager, Optional

import numpy as np
import torch

from mistral_train.checkpoint.state import restore_rng_state
from mistral_train.config import RunConfig, dump_run_config
from mistral_train.data.batches import PAIR_OBJECTIVES, EpochBatches, TrainData, build_batches, pad_id_of
from mistral_train.data.collate import padding_share
from mistral_train.dist.accelerator import (
    backward, build_accelerator, clip_gradients, no_sync, prepare, release, shard_model, strategy_of,
)
from mistral_train.dist.gather import FullModel
from mistral_train.errors import reading_data
from mistral_train.model import Mistral
from mistral_train.tracking.plots import plot_run
from mistral_train.preflight import preflight
from mistral_train.tokenizer.tokenizer import load_tokenizer, resolve_tokenizer_path
from mistral_train.tokenizer.files import tokenizer_json, write_tokenizer_files
from mistral_train.tracking.metrics import MetricsLogger, progress_bar
from mistral_train.train.resume import load_checkpoint, resolve_resume, save_checkpoint
from mistral_train.train.evaluate import evaluate_loss, exact_match
from mistral_train.train.export import export_final, merge_adapter_folder, write_sample
from mistral_train.train.model_setup import build_model, compile_enabled, load_model_weights, save_model_folder
from mistral_train.train.neftune import NEFTune
from mistral_train.train.optim import build_optimizer, build_scheduler
from mistral_train.train.preference import preference_objective
from mistral_train.train.stages import run_stages
from mistral_train.train.steps import Batch, Objective, get_objective

Autocast = Callable[[], ContextManager]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def backward_window(model: torch.nn.Module, objective: Objective, window: list[Batch], autocast: Autocast,
                    accelerator=None, n_tokens: Optional[int] = None,
                    world_size: int = 1) -> tuple[float, int, dict[str, float]]:
    """Accumulate the gradient of one window's unit-normalised loss; return (loss, units, stats).

    Args:
        window: this process's micro-batches, already on the model's device.
        accelerator: backward through it (dist.backward: the engine's own under DeepSpeed), gradient
            sync skipped (dist.no_sync) on all but the last micro-batch; None: plain `loss.backward()`.
        n_tokens: units (label tokens, pairs) of the whole window over all processes (`next_window`);
            default: counted over `window`.
        world_size: processes whose gradients DDP averages (FSDP2 and ZeRO average the same way).
    Returns:
        this process's summed unit loss / n_tokens (the window's loss when world_size is 1; summed
        over processes otherwise), n_tokens, and the step's statistics divided the same way.
    """
    if n_tokens is None:
        n_tokens = sum(objective.count(batch) for batch in window)
    if n_tokens == 0:
        raise ValueError("an accumulation window has no label tokens (every label is -100)")
    denominator = n_tokens / world_size  # DDP divides the summed gradient by world_size again
    total, stats = 0.0, {}
    for i, batch in enumerate(window):
        last = i == len(window) - 1
        with contextlib.nullcontext() if accelerator is None or last else no_sync(accelerator, model):
            with autocast():
                out = objective.step(model, batch)
            loss = out.loss_sum / denominator
            loss.backward() if accelerator is None else backward(accelerator, loss, last)
        total += float(out.loss_sum.detach())
        for key, value in (out.stats or {}).items():
            stats[key] = stats.get(key, 0.0) + float(value)
    return total / n_tokens, n_tokens, {key: value / n_tokens for key, value in stats.items()}


def next_window(batches: EpochBatches, objective: Objective, grad_accum_steps: int, num_processes: int = 1,
                process_index: int = 0) -> tuple[list[Batch], int, list[Batch]]:
    """Draw the next window: (this process's micro-batches, label tokens of the whole window,
    every batch drawn, for metrics). Every process draws the same batches and keeps every
    `num_processes`-th, starting at its index."""
    drawn = [next(batches) for _ in range(grad_accum_steps * num_processes)]
    return drawn[process_index::num_processes], sum(objective.count(b) for b in drawn), drawn


def evaluate(model, objective: Objective, data: TrainData, tokenizer, cfg: RunConfig, autocast: Autocast,
             accelerator, full_model: Optional[FullModel] = None) -> tuple[dict[str, float], list[dict]]:
    """Held-out loss and perplexity (every process), and exact match of greedy replies on held-out
    rows that carry an "answer" (main process, on `full_model`'s gathered weights when sharded).
    Returns (metrics, generation samples)."""
    metrics: dict[str, float] = {}
    if data.eval_batches:
        language = cfg.trainer.objective not in PAIR_OBJECTIVES  # perplexity of a DPO or reward loss means nothing
        metrics.update(evaluate_loss(model, objective.step, data.eval_batches, autocast, perplexity=language))
    answered = any("answer" in row for row in data.eval_rows or [])
    samples: list[dict] = []
    generates = cfg.trainer.objective != "reward"
    if answered and generates and cfg.trainer.eval_max_new_tokens > 0:
        # gathering is collective under sharding: every process takes part, the main one generates
        trained = full_model.collect(model) if full_model is not None else accelerator.unwrap_model(model)
        if accelerator.is_main_process:
            result = exact_match(trained, tokenizer, data.eval_rows, cfg.data.chat_format,
                                 cfg.trainer.eval_max_new_tokens, cfg.trainer.batch_size * cfg.trainer.grad_accum_steps)
            metrics["exact_match"], samples = result["exact_match"], result["samples"]
    return metrics, samples


def fit(cfg: RunConfig) -> Path:
    """Train as `cfg` says; return the run folder (config.yaml, metrics.jsonl, loss.png,
    checkpoints/, final/, sample.txt). A recipe with `stages` runs one fit per stage
    (train/stages.py) and returns the folder that holds them."""
    preflight(cfg)  # paths, formats, device, run folder: before any data is read or model built
    if cfg.stages:
        return run_stages(cfg, fit)
    accelerator = build_accelerator(cfg.trainer)
    try:
        return _train(cfg, accelerator)
    finally:
        release(accelerator)


def _train(cfg: RunConfig, accelerator) -> Path:
    spec, main = cfg.trainer, accelerator.is_main_process
    say = print if main else (lambda *_: None)
    run_dir = Path(cfg.run.dir) / cfg.run.name
    resume_from = resolve_resume(cfg.resume, run_dir)
    seed_everything(spec.seed)
    tokenizer_path = resolve_tokenizer_path(cfg.model.tokenizer, cfg.model.path)
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.kind == "sentencepiece":  # its tokenizer.json, converted now rather than inside the first checkpoint write
        tokenizer_json(tokenizer)
    with reading_data():  # a ValueError here is about the user's rows: a one-line DataError (errors.py)
        data = build_batches(cfg, tokenizer, check=False)  # reads, tokenizes, audits: bad data stops before the model loads
        say("\n".join(data.summary))  # counts, audit table and "warning: " lines (examples dropped or cut for length)
        data.check_batch_size()  # after the summary, which shows why the data may not fill one batch
    pad_id = pad_id_of(tokenizer)
    task = "sequence_classification" if spec.objective == "reward" else "causal_lm"
    model = build_model(cfg.model, tokenizer, cfg.adapter, task, pad_id).to(accelerator.device)
    model.set_compile(compile_enabled(spec.compile, accelerator.device))  # lazy: blocks compile at the first step
    if spec.objective in PAIR_OBJECTIVES:  # before any checkpoint loads: the reference is the starting policy
        objective = preference_objective(cfg, model, data, pad_id, accelerator)
    else:
        objective = get_objective(spec.objective, spec.loss_chunk_size)
    full_model = FullModel(accelerator, model)  # before sharding: the structure full weights are gathered into
    model = shard_model(accelerator, model)  # FSDP2 shards here, so the optimizer is built over the shards
    # DeepSpeed steps our optimizer on its own fp32 master partitions: no bf16 remedy needed (train/optim.py)
    optimizer = build_optimizer(model, spec, engine_masters=strategy_of(accelerator).is_deepspeed)
    scheduler = build_scheduler(optimizer, spec)
    model, optimizer, scheduler = prepare(accelerator, model, optimizer, scheduler)
    # the bare model; unwrapping imports DeepSpeed when it is installed (seconds): now, not at the first checkpoint
    unwrapped = accelerator.unwrap_model(model)
    train_objective = objective
    if cfg.data.neftune_alpha is not None:  # noise in training forwards only; evaluation stays clean
        neftune = NEFTune(cfg.data.neftune_alpha)
        neftune.attach(unwrapped)
        train_objective = neftune.wrap(objective)
    def write_folder(trained: Mistral, folder: Path) -> None:  # a checkpoint's or final/'s weights + tokenizer
        save_model_folder(trained, folder, cfg.model, cfg.adapter)
        write_tokenizer_files(tokenizer, folder, cfg.data.chat_format)

    start = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, accelerator, model, lambda folder: load_model_weights(unwrapped, folder),
                                optimizer, scheduler, data.train)
        restore_rng_state(state["rng"])  # last: nothing else draws random numbers before the next step
        start = state["step"]
        say(f"resumed from {resume_from} at step {start}")
    if main:
        dump_run_config(cfg, run_dir / "config.yaml")
    logger = MetricsLogger(run_dir, cfg.tracking, config=dataclasses.asdict(cfg),
                           resume_step=start if resume_from is not None else None, enabled=main)

    def log_eval(step: int, metrics: dict) -> dict:
        results, samples = evaluate(model, objective, data, tokenizer, cfg, accelerator.autocast, accelerator, full_model)
        if samples:
            logger.log_samples(step, samples)
        return {**metrics, **results}

    if spec.eval_before_training and start == 0:
        logger.log(0, log_eval(0, {}))
    bar = progress_bar(spec.max_steps, start, cfg.tracking.progress_bar and main)
    model.train()
    max_norm = spec.grad_clip if spec.grad_clip > 0 else float("inf")  # inf: the norm is still computed, for the log
    world, rank = accelerator.num_processes, accelerator.process_index
    began, first_loss, last_loss = time.perf_counter(), math.nan, math.nan
    # throughput over training steps only (evaluation and checkpoint writes excluded), and padding,
    # both averaged over the steps since the last log row
    tokens_since, seconds_since, shares = 0, 0.0, []
    for step in range(start, spec.max_steps):
        tick = time.perf_counter()
        mine, n_tokens, drawn = next_window(data.train, objective, spec.grad_accum_steps, world, rank)
        window = [{k: v.to(accelerator.device) for k, v in b.items() if k != "pad_mask"} for b in mine]
        last_loss, _, stats = backward_window(model, train_objective, window, accelerator.autocast, accelerator,
                                              n_tokens, world)
        if world > 1:  # each process's share of the window's mean: their sum is the mean
            summed = accelerator.reduce(torch.tensor([last_loss, *stats.values()], device=accelerator.device), "sum")
            last_loss, stats = float(summed[0]), dict(zip(stats, summed[1:].tolist()))
        first_loss = last_loss if step == start else first_loss
        grad_norm = clip_gradients(accelerator, model, max_norm)
        lr = float(optimizer.param_groups[0]["lr"])  # torchao keeps it as a tensor
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        done, seconds = step + 1, time.perf_counter() - tick
        n_inputs = sum(batch["input_ids"].numel() for batch in drawn)
        tokens_since, seconds_since = tokens_since + n_inputs, seconds_since + seconds
        shares += [padding_share(b) for b in drawn if "attention_mask" in b or "pad_mask" in b]
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{n_inputs / seconds:.0f}")
        metrics = {"loss": last_loss, **stats, "lr": lr, "grad_norm": grad_norm}
        evaluating = done == spec.max_steps or bool(spec.eval_every and done % spec.eval_every == 0)
        if evaluating:
            metrics = log_eval(done, metrics)
        if evaluating or done == 1 or done % spec.log_every == 0:
            metrics["tokens_per_s"] = tokens_since / seconds_since
            metrics["epoch"] = data.train.progress  # epochs done: items served / items per epoch (1.0: one pass)
            if shares:
                metrics["padding_share"] = sum(shares) / len(shares)
            logger.log(done, metrics)
            tokens_since, seconds_since, shares = 0, 0.0, []
        if done == spec.max_steps or (spec.save_every and done % spec.save_every == 0):
            trained = full_model.collect(model, trainable_only=cfg.adapter.kind != "none")  # every process
            save_checkpoint(accelerator, run_dir, done, model, optimizer, scheduler, data.train.state_dict(),
                            lambda folder: write_folder(trained, folder), spec.keep_last)
    bar.close()
    logger.close()
    trained = full_model.collect(model)  # every process; the full model on the main one
    if main:
        if spec.max_steps > start:
            print(f"trained steps {start + 1}-{spec.max_steps} in {time.perf_counter() - began:.0f}s; "
                  f"loss {first_loss:.3f} -> {last_loss:.3f}")
        export_final(lambda folder: write_folder(trained, folder), run_dir / "final")
        if cfg.adapter.kind != "none" and cfg.adapter.merge_at_end:
            merge_adapter_folder(run_dir / "final", run_dir / "merged")
        if cfg.tracking.plot:
            plot_run(run_dir)
        if task == "causal_lm":
            write_sample(trained, tokenizer, cfg, run_dir / "sample.txt", chat=data.stats is not None)
    accelerator.wait_for_everyone()
    return run_dir
