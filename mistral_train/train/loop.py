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
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional

import numpy as np
import torch

from mistral_train.checkpoint.state import restore_rng_state
from mistral_train.config import RunConfig, dump_run_config
from mistral_train.data.epochs import EpochBatches, TrainData
from mistral_train.data.spec import pad_id_of
from mistral_train.dist.accelerator import (
    backward, build_accelerator, clip_gradients, no_sync, prepare, release, shard_model, strategy_of,
)
from mistral_train.dist.gather import FullModel
from mistral_train.errors import reading_data
from mistral_train.model import Mistral
from mistral_train.model.moe import take_aux_loss, take_expert_load
from mistral_train.train.preflight import preflight
from mistral_train.tokenizer.files import tokenizer_json, write_tokenizer_files
from mistral_train.tokenizer.tokenizer import load_tokenizer, resolve_tokenizer_path
from mistral_train.tracking.metrics import Meter, MetricsLogger, expert_load_metrics, progress_bar
from mistral_train.tracking.plots import plot_run
from mistral_train.train.evaluate import checkable, evaluate_loss, exact_match
from mistral_train.train.guards import (
    NonFiniteGuard, Preempted, Preemption, agreed, batch_position, check_weights_finite, is_finite,
)
from mistral_train.train.export import export_final, merge_adapter_folder, write_sample
from mistral_train.train.model_setup import build_model, compile_enabled, load_model_weights, save_model_folder
from mistral_train.train.neftune import NEFTune
from mistral_train.train.objectives import ObjectiveEntry, objective_entry
from mistral_train.train.optim import build_optimizer, build_scheduler
from mistral_train.train.resume import load_checkpoint, resolve_resume, save_checkpoint
from mistral_train.train.run_data import read_data
from mistral_train.train.stages import run_stages
from mistral_train.train.steps import Batch, Objective

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
    total, stats, aux_total, load = 0.0, {}, None, None
    for i, batch in enumerate(window):
        last = i == len(window) - 1
        with contextlib.nullcontext() if accelerator is None or last else no_sync(accelerator, model):
            with autocast():
                out = objective.step(model, batch)
            loss = out.loss_sum / denominator
            aux = take_aux_loss(model)  # experts: coef * load-balancing loss of this forward, whatever the objective
            if aux is not None:  # the window's mean over its micro-batches (DDP averages over processes)
                loss = loss + aux[0] / len(window)
                aux_total = (aux_total or 0.0) + float(aux[1])
            routed = take_expert_load(model)  # experts: tokens per expert per layer of this forward
            if routed is not None:
                load = routed if load is None else load + routed
            loss.backward() if accelerator is None else backward(accelerator, loss, last)
        total += float(out.loss_sum.detach())
        for key, value in (out.stats or {}).items():
            stats[key] = stats.get(key, 0.0) + float(value)
    means = {key: value / n_tokens for key, value in stats.items()}
    if aux_total is not None:  # each process's share of the window's mean, like the loss
        means["router_aux_loss"] = aux_total / (len(window) * world_size)
    if load is not None:  # counts, not means: summed over processes they are the window's tokens per expert
        means.update(expert_load_metrics(load))
    return total / n_tokens, n_tokens, means


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
    entry = objective_entry(cfg.trainer.objective)
    if data.eval_batches:  # perplexity of a DPO or reward loss means nothing
        metrics.update(evaluate_loss(model, objective.step, data.eval_batches, autocast, perplexity=entry.perplexity))
    answered = any(checkable(row) for row in data.eval_rows or [])  # an "answer", or a final tool call
    samples: list[dict] = []
    if answered and entry.generates and cfg.trainer.eval_max_new_tokens > 0:
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


@dataclass
class Run:
    """What `_setup` builds for the steps and the end of one run."""

    cfg: RunConfig
    accelerator: Any
    run_dir: Path
    entry: ObjectiveEntry
    tokenizer: Any
    data: TrainData
    model: torch.nn.Module  # as prepared by Accelerate (wrapped under DDP, an engine under DeepSpeed)
    full_model: FullModel  # gathers full weights from the shards
    objective: Objective  # evaluation's: no NEFTune noise
    train_objective: Objective
    optimizer: Any
    scheduler: Any
    logger: MetricsLogger
    start: int  # steps done before this process started (resume)

    def write_folder(self, trained: Mistral, folder: Path) -> None:
        """A checkpoint's or final/'s weights and tokenizer files."""
        save_model_folder(trained, folder, self.cfg.model, self.cfg.adapter)
        write_tokenizer_files(self.tokenizer, folder, self.cfg.data.chat_format)

    def evaluate(self, step: int, metrics: dict) -> dict:
        """`metrics` with the held-out metrics of `step` added (samples go to the log)."""
        results, samples = evaluate(self.model, self.objective, self.data, self.tokenizer, self.cfg,
                                    self.accelerator.autocast, self.accelerator, self.full_model)
        if samples:
            self.logger.log_samples(step, samples)
        return {**metrics, **results}


def _train(cfg: RunConfig, accelerator) -> Path:
    # handlers first: a signal during setup also stops the run at the first step boundary
    with Preemption(cfg.trainer.preemption_signals, cfg.trainer.preemption_grace_s) as preemption:
        return _train_steps(cfg, accelerator, preemption)


def _train_steps(cfg: RunConfig, accelerator, preemption: Preemption) -> Path:
    guard = NonFiniteGuard(cfg.trainer.max_nonfinite_steps)
    spec, run = cfg.trainer, _setup(cfg, accelerator)
    if spec.eval_before_training and run.start == 0:
        run.logger.log(0, run.evaluate(0, {}))
    bar = progress_bar(spec.max_steps, run.start, cfg.tracking.progress_bar and accelerator.is_main_process)
    meter = Meter()
    run.model.train()
    for step in range(run.start, spec.max_steps):
        done = step + 1
        metrics, tokens_per_s = _step(run, meter, guard, done)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}", tok_s=f"{tokens_per_s:.0f}")
        evaluating = done == spec.max_steps or bool(spec.eval_every and done % spec.eval_every == 0)
        if evaluating:
            metrics = run.evaluate(done, metrics)
        if evaluating or done == 1 or done % spec.log_every == 0:
            run.logger.log(done, {**metrics, **meter.row(run.data.train.progress)})
        preempted = done < spec.max_steps and preemption.due(accelerator)  # the step boundary: every process agrees
        if preempted or done == spec.max_steps or (spec.save_every and done % spec.save_every == 0):
            # the last step always saves, so final/ (written from the same weights) is checked here too
            check_weights_finite(accelerator, run.model, done, f"checkpoint step_{done}")
            trained = run.full_model.collect(run.model, trainable_only=cfg.adapter.kind != "none")  # every process
            saved = save_checkpoint(
                accelerator, run.run_dir, done, run.model, run.optimizer, run.scheduler,
                run.data.train.state_dict(), lambda folder: run.write_folder(trained, folder), spec.keep_last,
                data_files=run.data.files,  # the last save, and a preempted one, have no next one to retry at: they stop
                save_failure=spec.save_failure if done < spec.max_steps and not preempted else "stop",
                objective_state=run.objective.state_dict() if run.objective.state_dict else None)
        if preempted:
            bar.close()
            run.logger.close()
            accelerator.wait_for_everyone()
            line = preemption.message(done, saved if saved is not None else run.run_dir / "checkpoints" / f"step_{done}")
            if accelerator.is_main_process:
                print(line, flush=True)
            raise Preempted(line)
    bar.close()
    run.logger.close()
    _end(run, meter)
    accelerator.wait_for_everyone()
    return run.run_dir


def _setup(cfg: RunConfig, accelerator) -> Run:
    """Tokenizer, data (read and audited before the model loads), model, objective, optimizer, resume, log."""
    spec, say = cfg.trainer, print if accelerator.is_main_process else (lambda *_: None)
    entry, run_dir = objective_entry(spec.objective), Path(cfg.run.dir) / cfg.run.name
    resume_from = resolve_resume(cfg.resume, run_dir)
    seed_everything(spec.seed)
    tokenizer = load_tokenizer(resolve_tokenizer_path(cfg.model.tokenizer, cfg.model.path))
    tokenizer_json(tokenizer)  # the folders' tokenizer.json, converted now (cached) rather than inside the first checkpoint write
    with reading_data():  # a ValueError here is about the user's rows: a one-line DataError (errors.py)
        data = read_data(cfg, tokenizer, check=False)  # reads, tokenizes, audits: bad data stops before the model loads
        say("\n".join(data.summary))  # counts, audit table and "warning: " lines (examples dropped or cut for length)
        data.check_batch_size()  # after the summary, which shows why the data may not fill one batch
    pad_id = pad_id_of(tokenizer)
    model = build_model(cfg.model, tokenizer, cfg.adapter, entry.task, pad_id).to(accelerator.device)
    model.set_compile(compile_enabled(spec.compile, accelerator.device))  # lazy: blocks compile at the first step
    objective = entry.build(cfg, model, data, pad_id, accelerator)  # before any checkpoint loads (a reference)
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
    start = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, accelerator, model, lambda folder: load_model_weights(unwrapped, folder),
                                optimizer, scheduler, data.train, data.files, cfg.data.changed_data)
        if state["objective"] is not None and objective.load_state_dict is not None:
            objective.load_state_dict(state["objective"])  # GRPO: the rollout window, its uses, the generation RNG
        restore_rng_state(state["rng"])  # last: nothing else draws random numbers before the next step
        start = state["step"]
        say(f"resumed from {resume_from} at step {start}")
    if accelerator.is_main_process:
        dump_run_config(cfg, run_dir / "config.yaml")
    logger = MetricsLogger(run_dir, cfg.tracking, config=dataclasses.asdict(cfg),
                           resume_step=start if resume_from is not None else None, enabled=accelerator.is_main_process)
    return Run(cfg, accelerator, run_dir, entry, tokenizer, data, model, full_model, objective, train_objective,
               optimizer, scheduler, logger, start)


def _step(run: Run, meter: Meter, guard: Optional[NonFiniteGuard] = None,
          step: int = 0) -> tuple[dict[str, float], float]:
    """One optimizer step over one accumulation window: (its metrics, tokens per second). With `guard`, a
    non-finite loss or gradient norm skips the update (train/guards.py); `step` is this step's number (1-based)."""
    accelerator, spec, tick = run.accelerator, run.cfg.trainer, time.perf_counter()
    world, rank = accelerator.num_processes, accelerator.process_index
    position = run.data.train.state_dict()  # names the window's batches if the step is skipped
    if run.objective.draw is not None:  # GRPO/RLOO: a rollout with the current policy (train/online.py)
        mine, n_tokens, drawn = run.objective.draw(run.model, run.data.train, spec.grad_accum_steps, world, rank)
    else:
        mine, n_tokens, drawn = next_window(run.data.train, run.objective, spec.grad_accum_steps, world, rank)
    window = [{k: v.to(accelerator.device) for k, v in b.items() if k != "pad_mask"} for b in mine]
    loss, _, stats = backward_window(run.model, run.train_objective, window, accelerator.autocast, accelerator,
                                     n_tokens, world)
    if world > 1:  # each process's share of the window's mean: their sum is the mean
        summed = accelerator.reduce(torch.tensor([loss, *stats.values()], device=accelerator.device), "sum")
        loss, stats = float(summed[0]), dict(zip(stats, summed[1:].tolist()))
    max_norm = spec.grad_clip if spec.grad_clip > 0 else float("inf")  # inf: the norm is still computed, for the log
    grad_norm = clip_gradients(accelerator, run.model, max_norm)
    lr = float(run.optimizer.param_groups[0]["lr"])  # torchao keeps it as a tensor
    # the loss is the window's over all processes, the norm global: every process agrees (agreed sums the flag
    # anyway: a gradient made NaN on one process after DDP's sync shows in that process's norm only)
    if guard is not None and agreed(accelerator, not (is_finite(loss) and is_finite(grad_norm))):
        run.optimizer.zero_grad(set_to_none=True)  # no optimizer or scheduler step (Megatron-LM's skipped iteration)
        # DeepSpeed's engine already stepped inside backward (dist.backward): counted, but the update is its call
        action = "update left to the DeepSpeed engine" if strategy_of(accelerator).is_deepspeed else "update skipped"
        line = guard.skip(step, loss, float(grad_norm), batch_position(position), action)
        if accelerator.is_main_process:
            print(f"warning: {line}")
    else:
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        if guard is not None:
            guard.ok()
    tokens_per_s = meter.add(drawn, time.perf_counter() - tick, loss)
    metrics = {"loss": loss, **stats, "lr": lr, "grad_norm": grad_norm}
    if guard is not None and guard.skipped:  # logged from the first skip on, so a clean run's log is unchanged
        metrics["skipped_steps"] = guard.skipped
    return metrics, tokens_per_s


def _end(run: Run, meter: Meter) -> None:
    """final/ (and merged/), loss.png and sample.txt, written by the main process from the full model."""
    cfg, run_dir = run.cfg, run.run_dir
    trained = run.full_model.collect(run.model)  # every process; the full model on the main one
    if not run.accelerator.is_main_process:
        return
    if cfg.trainer.max_steps > run.start:
        print(f"trained steps {run.start + 1}-{cfg.trainer.max_steps} in {time.perf_counter() - meter.began:.0f}s; "
              f"loss {meter.first_loss:.3f} -> {meter.last_loss:.3f}")
    export_final(lambda folder: run.write_folder(trained, folder), run_dir / "final")
    if cfg.adapter.kind != "none" and cfg.adapter.merge_at_end:
        merge_adapter_folder(run_dir / "final", run_dir / "merged")
    if cfg.tracking.plot:
        plot_run(run_dir, loss=run.entry.loss_label(cfg.trainer.dpo.loss_type))
    if run.entry.generates:
        write_sample(trained, tokenizer=run.tokenizer, cfg=cfg, path=run_dir / "sample.txt", chat=run.entry.chat)
