"""A live vLLM engine the training loop samples from: started once on a model folder, given the current
weights (`push_weights`) or adapter (`push_adapter`) after each update, asked for continuations of
token-id prompts with the conventions of `mistral_train.generate.generate`.

vLLM runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0 is set unless the caller chose), so a
weight push hands tensors over without a copy through files. vLLM is an optional dependency with its
own pins (scripts/setup_vllm.sh builds `.venv-vllm`); it is imported when an engine is built, never
when this module is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from mistral_train.adapters.expert_lora import ExpertLoRA
from mistral_train.adapters.lora import LoRALinear


def _import_vllm() -> Any:
    # in-process engine: `LLM(...)` in seconds, and collective_rpc reaches the worker's model directly
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; tiny models and short rollouts need little
    try:
        import vllm
    except ImportError as error:
        raise ImportError(f"VLLMEngine needs vLLM ({error}); build its environment with scripts/setup_vllm.sh "
                          "and run with .venv-vllm/bin/python") from error
    return vllm


class VLLMEngine:
    """One vLLM engine serving an HF folder (a run's final/ or merged/, or the base of an adapter run).

    Args:
        folder: the HF model folder the engine starts from (config.json, safetensors, tokenizer files).
        dtype: the engine's compute dtype ("float32" | "bfloat16" | "float16").
        max_model_len: longest prompt + completion; default: the folder's max_position_embeddings.
        max_lora_rank: when set, the engine serves LoRA adapters up to this rank (`push_adapter`).
        seed: the engine's seed (sampling with `seed=None`).
        engine_kwargs: passed to `vllm.LLM` as they are (gpu_memory_utilization, ...).
    """

    def __init__(self, folder: Union[str, Path], dtype: str = "float32", max_model_len: Optional[int] = None,
                 max_lora_rank: Optional[int] = None, seed: int = 0, **engine_kwargs: Any):
        vllm = _import_vllm()
        from vllm.lora.request import LoRARequest

        self._vllm, self._lora_request_type = vllm, LoRARequest
        lora = dict(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1) if max_lora_rank else {}
        self.llm = vllm.LLM(model=str(folder), dtype=dtype, max_model_len=max_model_len, seed=seed,
                            enforce_eager=not torch.cuda.is_available(), **lora, **engine_kwargs)
        self.max_model_len: int = self.llm.llm_engine.model_config.max_model_len
        self._adapter: Optional[Any] = None  # the LoRARequest every generate call uses, once pushed
        self._adapter_count = 0

    def generate(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_p: Optional[float] = None, top_k: Optional[int] = None, eos_token_id: Optional[int] = None,
                 seed: Optional[int] = None) -> list[list[int]]:
        """Continue each prompt by up to `max_new_tokens` tokens, as `generate.generate` does.

        Args:
            prompt_ids: token-id prompts (lists of different lengths; no padding needed).
            temperature: 0 is greedy; top_p/top_k None mean no cut, as in `generate.sample_next`.
            eos_token_id: a row stops after emitting it (it is kept); None: the folder's EOS
                (generation_config.json).
            seed: row i samples with seed + i (rows of one prompt repeated for a GRPO group then
                differ); None draws from the engine's generator.
        Returns:
            one list per prompt: the prompt followed by its continuation, unpadded (where
            `generate.generate` pads finished rows to one (B, T + n) tensor).
        """
        longest = max((len(p) for p in prompt_ids), default=0)
        if longest + max_new_tokens > self.max_model_len:
            raise ValueError(f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds the engine's "
                             f"max_model_len ({self.max_model_len})")
        stop = dict(ignore_eos=True, stop_token_ids=[eos_token_id]) if eos_token_id is not None else {}
        params = [self._vllm.SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                                            top_p=1.0 if top_p is None else top_p,
                                            top_k=0 if top_k is None else top_k,
                                            seed=None if seed is None else seed + i, **stop)
                  for i in range(len(prompt_ids))]
        prompts = [self._vllm.inputs.TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompt_ids]
        outputs = self.llm.generate(prompts, params, lora_request=self._adapter, use_tqdm=False)
        return [list(out.prompt_token_ids) + list(out.outputs[0].token_ids) for out in outputs]

    @torch.no_grad()
    def push_weights(self, model: torch.nn.Module) -> None:
        """Load `model`'s current weights (a plain `Mistral`, full fine-tuning) into the live engine.
        Adapter runs push their adapter folder instead (`push_adapter`): the engine keeps the base."""
        if any(isinstance(m, (LoRALinear, ExpertLoRA)) for m in model.modules()):  # experts' adapters too
            raise ValueError("push_weights takes a model without adapters; for a LoRA run save the adapter "
                             "(save_adapter) and call push_adapter(folder)")
        weights = [(name, tensor.detach()) for name, tensor in model.state_dict().items()]
        self.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=weights))
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights

    def push_adapter(self, folder: Union[str, Path]) -> None:
        """Serve the PEFT adapter in `folder` (adapter_config.json + adapter_model.safetensors) from now on.
        Each push is a new adapter id, so vLLM reads the folder again rather than reuse its cached copy."""
        if not (Path(folder) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{folder}: no adapter_config.json; push_adapter takes a PEFT adapter folder")
        if self._lora_request_type is None or not self.llm.llm_engine.vllm_config.lora_config:
            raise ValueError("push_adapter needs an engine built with max_lora_rank=... (LoRA serving enabled)")
        if self._adapter is not None:
            self.llm.llm_engine.remove_lora(self._adapter.lora_int_id)
        self._adapter_count += 1
        self._adapter = self._lora_request_type(f"adapter-{self._adapter_count}", self._adapter_count, str(folder))
        self.llm.reset_prefix_cache()
