"""GRPO and RLOO in the one loop: the objective that draws its own training window by rollout.

Every `num_iterations` optimizer steps `Rollout.draw` takes one window of prompt batches (grad_accum_steps per
process, data/prompt_batches.py), samples num_generations completions of each prompt with the current policy
(rollout/sampling.py, looked up at call time so tests can feed fixed completions), scores them
(rollout/rewards.py), and turns them into training micro-batches (train/rl_step.py's keys):
  1. rewards: the reward functions' weighted nansum, NaN where every function declined (trl);
  2. RLOO with beta > 0: minus beta times the summed (old - ref) log-ratio (a reward penalty, trl's RLOO);
  3. advantages over the whole window of every process (GRPO: group_advantages; RLOO: leave-one-out);
  4. old log-probs (when the window is reused: num_iterations > 1; always for RLOO, whose ratio is against
     them) and reference log-probs (GRPO with beta > 0), under no_grad, the policy in its training mode so the
     first pass's ratio is exactly 1;
  5. the window's units (train/rl_step.py): its completion tokens over all processes for dapo/cispo/vespo.
Between rollouts the buffered window is returned as is: the loop takes num_iterations optimizer steps on it.

The state a resume needs (tensors and ints only: read back with weights_only=True) is `state_dict()`: the
buffered window, how many steps it has served, the generation RNG. A run resumed from step k therefore samples
exactly what the uninterrupted run sampled at step k + 1, and a mid-iteration window is reused, not redrawn.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from mistral_train.config import GRPOSpec
from mistral_train.errors import ConfigError
from mistral_train.losses.grpo import GRPO_LOSSES, REWARD_SCALES, _nanstd, group_advantages
from mistral_train.losses.rloo import rloo_advantages, rloo_kl_penalty
from mistral_train.rollout import sampling
from mistral_train.train.rl_step import METRIC, TOKEN_NORMALISED, completion_logps, count_units, grpo_step, rloo_step
from mistral_train.train.steps import Batch, Objective

Autocast = Callable[[], Any]
Reference = Callable[[torch.nn.Module, Batch], torch.Tensor]  # (policy, batch) -> (N, C) reference log-probs


class Rollout:
    """The rollout side of a GRPO/RLOO objective: `draw` (the loop's seam) and the resumable state.

    Args:
        spec: trainer.grpo. rloo: RLOO's advantages, KL penalty and loss instead of GRPO's.
        reward_set: rollout.rewards' RewardSet (names, weights (F,), score(prompts, completions, rows) -> (N, F)).
        decode: completion token ids -> text, as the reward functions read it.
        prompt_rows: TrainData.prompt_rows, indexed by each prompt batch's row_index.
        eos_token_id, pad_id: where a completion stops and what pads it.
        reference: the reference's per-token log-probs (None: beta == 0).
        generate_model: (loop's model) -> the bare policy generation runs on (unwrapped from DDP).
        gather: (tensor) -> the same tensor concatenated over processes (identity on one process).
        device, autocast, chunk: where batches live, the loop's autocast, loss_chunk_size.
        seed: seeds the generation RNG (its own, so generation never shifts the global RNG streams).
    """

    def __init__(self, spec: GRPOSpec, rloo: bool, reward_set, decode: Callable[[list[int]], str],
                 prompt_rows: list[dict], eos_token_id: int, pad_id: int, reference: Optional[Reference],
                 generate_model: Callable[[torch.nn.Module], torch.nn.Module],
                 gather: Callable[[torch.Tensor], torch.Tensor],
                 device: torch.device, autocast: Autocast, chunk: int, seed: int):
        self.spec, self.rloo, self.reward_set, self.decode = spec, rloo, reward_set, decode
        self.prompt_rows, self.eos_token_id, self.pad_id, self.reference = prompt_rows, eos_token_id, pad_id, reference
        self.generate_model, self.gather, self.device = generate_model, gather, device
        self.autocast, self.chunk = autocast, chunk
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.engine, self.sync = None, None  # rollout_engine=vllm: the engine and its weight push (online_vllm.py)
        self.window: list[Batch] = []  # this process's training micro-batches of the current rollout
        self.units = 0  # units of the whole window over all processes (train/rl_step.py)
        self.served = 0  # optimizer steps taken on the current window

    # -- the loop's seam --------------------------------------------------------------------------
    def draw(self, model: torch.nn.Module, batches, grad_accum_steps: int, num_processes: int = 1,
             process_index: int = 0) -> tuple[list[Batch], int, list[Batch]]:
        """(this process's training micro-batches, units of the whole window, batches for the meter)."""
        if not self.window or self.served >= self.spec.num_iterations:
            drawn = [next(batches) for _ in range(grad_accum_steps * num_processes)]
            self.window, self.units = self.rollout(model, drawn[process_index::num_processes],
                                                   grad_accum_steps * num_processes, process_index, num_processes)
            self.served = 0
        self.served += 1
        return self.window, self.units, [_as_sequences(b) for b in self.window]

    def state_dict(self) -> dict[str, Any]:
        return {"window": [{k: v.detach().cpu() for k, v in b.items()} for b in self.window], "units": int(self.units),
                "served": int(self.served), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window = [{k: v.to(self.device) for k, v in b.items()} for b in state["window"]]
        self.units, self.served = int(state["units"]), int(state["served"])
        self.generator.set_state(state["generator"])

    # -- one rollout ------------------------------------------------------------------------------
    def rollout(self, model: torch.nn.Module, prompt_batches: list[Batch], window_batches: int,
                process_index: int = 0, num_processes: int = 1) -> tuple[list[Batch], int]:
        """Sample, score and prepare this process's micro-batches; `window_batches` micro-batches over all processes."""
        spec, G = self.spec, self.spec.num_generations
        window, scores = [], []
        # one seed per rollout from the run's generation RNG (every process draws the same), then one generator per
        # micro-batch seeded by its place in the window: what a micro-batch samples is the same on any process count
        base = int(torch.randint(2**62, (1,), generator=self.generator, device=self.generator.device))
        if self.sync is not None:
            self.sync(model)  # the engine samples from the policy as it is now
        engine = {} if self.engine is None else {"engine": self.engine}  # the design's signature takes no engine
        for k, prompts in enumerate(prompt_batches):
            generator = torch.Generator(device=self.device)
            generator.manual_seed(base + process_index + k * num_processes)  # its index in the loop's draw order
            prompt_ids, prompt_mask = prompts["prompt_ids"].to(self.device), prompts["prompt_mask"].to(self.device)
            out = sampling.generate_completions(self.generate_model(model), prompt_ids, prompt_mask, spec,
                                                self.eos_token_id, self.pad_id, generator, **engine)
            completion_mask = out.mask.long()
            if spec.mask_truncated_completions:  # as trl: a truncated completion neither attends nor counts
                completion_mask = completion_mask * (~out.truncated).long()[:, None]
            rows = [self.prompt_rows[int(i)] for i in prompts["row_index"].repeat_interleave(G)]
            kept = [ids[keep.bool()].tolist() for ids, keep in zip(out.ids.cpu(), out.mask.cpu())]
            # a string prompt reaches the reward functions as a string, a message list as messages (trl's two kinds)
            scores.append(self.reward_set.score([row.get("prompt_text", row["prompt"]) for row in rows],
                                                [self.decode(ids) for ids in kept], [row["fields"] for row in rows],
                                                completion_ids=kept, where=[_where(row) for row in rows]))
            window.append({"prompt_ids": prompt_ids.repeat_interleave(G, dim=0),
                           "prompt_mask": prompt_mask.repeat_interleave(G, dim=0),
                           "completion_ids": out.ids, "completion_mask": completion_mask,
                           "truncated": out.truncated, "length": out.mask.sum(-1)})
        with torch.no_grad(), self.autocast():  # the log-probs the loss compares against, before any update
            for batch in window:
                if self.rloo or spec.num_iterations > 1:
                    batch["old_logps"] = completion_logps(model, batch, spec.temperature, self.chunk).float()
                if self.reference is not None:
                    batch["ref_logps"] = self.reference(model, batch).float()
        per_func = torch.cat(scores).to(self.device, torch.float32)  # (n, F): this process's completions
        rewards = self.reward_set.combine(per_func)
        penalty = None
        if self.rloo and self.reference is not None:
            penalty = torch.cat([rloo_kl_penalty(b["old_logps"], b["ref_logps"], b["completion_mask"]) for b in window])
        every_per_func, every_reward = self.gather(per_func), self.gather(rewards)
        trained = every_reward if penalty is None else every_reward - spec.beta * self.gather(penalty)
        if self.rloo:
            advantages = rloo_advantages(trained, G, spec.normalize_advantages)
        else:
            advantages = group_advantages(trained, G, spec.scale_rewards)
        mine = len(rewards)  # gather concatenates in rank order: this process's completions start at rank * mine
        start = process_index * mine
        advantages = advantages[start:start + mine].split([len(b["completion_ids"]) for b in window])
        tokens = torch.stack([b["completion_mask"].sum() for b in window]).sum()
        token_units = not self.rloo and spec.loss_type in TOKEN_NORMALISED
        units = int(self.gather(tokens.reshape(1)).sum()) if token_units else window_batches
        metrics = self._metrics(every_per_func, every_reward, torch.cat([self.gather(b["length"]) for b in window]),
                                torch.cat([self.gather(b["truncated"].long()) for b in window]), G)
        if penalty is not None:  # trl's RLOO logs its KL: the first-order estimate per completion token of the window
            kl_tokens = torch.stack([penalty.sum(), tokens.float()]).reshape(1, 2)
            kl_sum, kl_count = self.gather(kl_tokens).sum(0)
            metrics["kl"] = (kl_sum / kl_count.clamp(min=1.0)).detach().cpu()
        share = torch.tensor(units / window_batches)
        for batch, adv in zip(window, advantages):
            del batch["truncated"], batch["length"]
            batch["advantages"], batch["share"] = adv, share
            batch.update({METRIC + name: value for name, value in metrics.items()})
        if token_units and units == 0:
            raise ValueError("a rollout window has no completion tokens (every completion masked: "
                             "trainer.grpo.mask_truncated_completions with every completion truncated?)")
        return window, units

    def _zero_spread(self, rewards: torch.Tensor, G: int) -> torch.Tensor:
        """trl's frac_reward_zero_std: the share of groups whose rewards do not spread (a NaN spread, fewer than
        two scorable, is not zero); GRPO with scale_rewards=batch asks it of the whole window's spread (0 or 1)."""
        batch = not self.rloo and self.spec.scale_rewards == "batch"
        std = _nanstd(rewards).reshape(1) if batch else _nanstd(rewards.view(-1, G), dim=1)
        return torch.isclose(std, torch.zeros_like(std)).float().mean()

    def _metrics(self, per_func: torch.Tensor, rewards: torch.Tensor, lengths: torch.Tensor, truncated: torch.Tensor,
                 G: int) -> dict[str, torch.Tensor]:
        """The rollout's metrics with trl's names, over the whole window."""
        out = {"reward": torch.nanmean(rewards), "reward_std": _nanstd(rewards),
               "frac_reward_zero_std": self._zero_spread(rewards, G),
               "completions/mean_length": lengths.float().mean(), "completions/min_length": lengths.float().min(),
               "completions/max_length": lengths.float().max(), "completions/clipped_ratio": truncated.float().mean()}
        for i, name in enumerate(self.reward_set.names):
            out[f"rewards/{name}/mean"] = torch.nanmean(per_func[:, i])
            out[f"rewards/{name}/std"] = _nanstd(per_func[:, i])
        return {k: v.detach().float().cpu() for k, v in out.items()}


def _as_sequences(batch: Batch) -> Batch:
    """What the loop's meter reads (tokens per second, padding share): prompt + completion as one sequence."""
    return {"input_ids": torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1),
            "attention_mask": torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)}


def check_spec(spec: GRPOSpec, rloo: bool) -> None:
    """One-line ConfigErrors for settings the rollout cannot run."""
    choices = (("loss_type", spec.loss_type, GRPO_LOSSES), ("scale_rewards", spec.scale_rewards, REWARD_SCALES),
               ("importance_sampling_level", spec.importance_sampling_level, ("token", "sequence")),
               ("rollout_engine", spec.rollout_engine, ("generate", "vllm")))
    for key, value, allowed in choices:
        if value not in allowed:
            raise ConfigError(f"trainer.grpo.{key}={value!r}: expected one of {', '.join(allowed)}")
    if spec.num_iterations < 1:
        raise ConfigError(f"trainer.grpo.num_iterations={spec.num_iterations}: expected at least 1")
    if rloo and spec.num_generations < 2:
        raise ConfigError(f"trainer.grpo.num_generations={spec.num_generations}: RLOO's leave-one-out baseline needs "
                          "at least 2 completions per prompt")
    if spec.temperature <= 0 and spec.num_generations > 1:
        raise ConfigError(f"trainer.grpo.temperature={spec.temperature}: greedy decoding samples the same completion "
                          "num_generations times, so every advantage is 0; use a temperature > 0")


def online_objective(spec: GRPOSpec, rloo: bool, chunk: int, rollout: Rollout) -> Objective:
    """The Objective the loop trains: the GRPO or RLOO step, its unit count and the rollout as its `draw`."""
    step = rloo_step(spec, chunk) if rloo else grpo_step(spec, chunk)
    count = (lambda batch: 1) if rloo else count_units(spec)
    return Objective(step, count, draw=rollout.draw, state_dict=rollout.state_dict,
                     load_state_dict=rollout.load_state_dict)


def build_online(cfg, model: torch.nn.Module, data, pad_id: int, accelerator, rloo: bool) -> Objective:
    """The grpo/rloo entry's builder (train/objectives.py): called once the model is built and on its device,
    before any checkpoint loads (the reference is the policy the run starts from)."""
    from mistral_train.dist.accelerator import strategy_of
    from mistral_train.rollout.rewards import build_rewards  # the reward functions' module (issue 17 item 3)
    from mistral_train.tokenizer.tokenizer import load_tokenizer, resolve_tokenizer_path
    from mistral_train.train.reference import build_reference, resolve_reference

    spec, trainer = cfg.trainer.grpo, cfg.trainer
    check_spec(spec, rloo)
    strategy = strategy_of(accelerator)
    if strategy.sharded:  # generate() reads the embeddings and head outside the sharded modules' forwards, and a
        # vLLM weight push takes whole tensors: both need the whole policy on each process
        raise ConfigError(f"trainer.objective={trainer.objective} generates its completions with the whole policy on "
                          f"each process, and trainer.strategy={strategy.name} shards it; use ddp or zero2")
    if data.prompt_rows is None:
        raise ConfigError(f"trainer.objective={trainer.objective} needs prompt rows (data.format=prompt_only)")
    tokenizer = load_tokenizer(resolve_tokenizer_path(cfg.model.tokenizer, cfg.model.path))
    reference = None
    if spec.beta > 0:
        kind = resolve_reference(spec, cfg.adapter, key="trainer.grpo", free=False)
        chunk = trainer.loss_chunk_size
        reference = build_reference(kind, model, chunk,
                                    score=lambda m, b: completion_logps(m, b, spec.temperature, chunk))
    world = accelerator.num_processes
    rollout = Rollout(spec, rloo, build_rewards(spec, tokenizer), lambda ids: tokenizer.decode(ids, skip_special=True),
                      data.prompt_rows, tokenizer.eos_id, pad_id, reference, accelerator.unwrap_model,
                      accelerator.gather if world > 1 else (lambda t: t), accelerator.device, accelerator.autocast,
                      trainer.loss_chunk_size, trainer.seed)
    if spec.rollout_engine == "vllm":
        from mistral_train.train.online_vllm import vllm_rollouts

        rollout.engine, rollout.sync = vllm_rollouts(cfg, accelerator)
    return online_objective(spec, rloo, trainer.loss_chunk_size, rollout)


def _where(row: dict) -> str:
    """"FILE row K" of a canonical row, for a reward function's error."""
    return f"{row['source']} row {row['row']}" if "source" in row and "row" in row else "a prompt row"
