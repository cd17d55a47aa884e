"""trainer.grpo.rollout_engine=vllm: the live vLLM engine a GRPO/RLOO run samples from, and how the policy's
current weights reach it before each rollout.

The engine starts once on the run's base folder (model.path). Before every rollout `sync(model)` hands it the
policy as it is now: full fine-tuning pushes the weights in memory (`VLLMEngine.push_weights`); an adapter run
writes its adapter (PEFT format) to `run_dir/vllm_adapter/N` and serves it (`push_adapter`), the engine keeping
the base, so what is sampled is the model being trained. vLLM is optional: imported only here, when asked for.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from mistral_train.errors import ConfigError


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def _lora_slot(r: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds rank `r` (an adapter of rank 4 is served in an 8 slot)."""
    for slot in VLLM_LORA_RANKS:
        if slot >= r:
            return slot
    raise ConfigError(f"adapter.r={r}: vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}; use a smaller rank or "
                      "trainer.grpo.rollout_engine=generate")


def vllm_rollouts(cfg, accelerator) -> tuple[Any, Callable[[torch.nn.Module], None]]:
    """(engine, sync): a VLLMEngine on model.path and the function that pushes the current policy into it."""
    from mistral_train.adapters import save_adapter
    from mistral_train.rollout.vllm_engine import VLLMEngine

    if not cfg.model.path:
        raise ConfigError("trainer.grpo.rollout_engine=vllm needs model.path (an HF folder the engine starts from)")
    adapter = cfg.adapter.kind != "none"
    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(cfg.trainer.precision, "float32")
    max_len = cfg.trainer.max_seq_len + cfg.trainer.grpo.max_completion_length
    engine = VLLMEngine(cfg.model.path, dtype=dtype, max_model_len=max_len, seed=cfg.trainer.seed,
                        max_lora_rank=_lora_slot(cfg.adapter.r) if adapter else None)
    folder = Path(cfg.run.dir) / cfg.run.name / "vllm_adapter"
    pushes = [0]

    def sync(model: torch.nn.Module) -> None:
        bare = accelerator.unwrap_model(model)
        if not adapter:
            engine.push_weights(bare)
            return
        pushes[0] += 1
        target = folder / str(pushes[0])
        save_adapter(bare, target, cfg.model.path)
        engine.push_adapter(target)
        shutil.rmtree(folder / str(pushes[0] - 1), ignore_errors=True)  # the engine has read the newer one

    return engine, sync
