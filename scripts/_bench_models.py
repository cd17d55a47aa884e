"""The models bench_lora.py and bench_dpo.py compare: ours and transformers (+ peft, + bitsandbytes), same weights.

`write_models` saves, once per run, what every side loads: an HF folder of a seeded model (`base/`),
a PEFT adapter on every linear of it (`adapter/`: r 16, alpha 32, dropout 0; lora_B drawn non-zero
so the adapter changes the loss and first-step losses can be compared across sides), the same
adapter freshly initialised (`adapter0/`: lora_B = 0, as a new adapter starts), and the real
Mistral v1 tokenizer as a transformers folder (`tokenizer/`: trl reads its pad id).
Kinds: "full" (every weight trains), "lora" (adapters on a frozen float base), "qlora" (adapters
on an NF4 base: ours `quantize="nf4"`, theirs bitsandbytes `Linear4bit` via BitsAndBytesConfig).
Also shared by the two: the optimizers each side's trainer builds, the child's step loop (forward
and backward, clip, optimizer step) and the ours-vs-peer markdown table.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Callable

import torch

import _bench_common as mem
from mistral_train import Mistral, MistralConfig
from mistral_train.adapters import LoraConfig, apply_lora, load_adapter, lora_layers, save_adapter
from mistral_train.config import TrainerSpec
from mistral_train.tokenizer.tokenizer import bundled_tokenizer_path
from mistral_train.train.optim import build_optimizer

KINDS = ("full", "lora", "qlora")
LORA = dict(r=16, alpha=32.0, dropout=0.0, target_modules="all-linear")  # all linears but the LM head, MLP included
LR = 1e-4
LORA_B_STD = 0.01


def write_models(folder: Path, arch: dict, seed: int = 0) -> None:
    """folder/base, folder/adapter and folder/tokenizer (see the module docstring)."""
    torch.manual_seed(seed)
    model = Mistral(MistralConfig(**arch))
    model.save_pretrained(folder / "base")
    apply_lora(model, LoraConfig(**LORA))
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=LORA_B_STD)
    save_adapter(model, folder / "adapter")
    for _, layer in lora_layers(model):
        torch.nn.init.zeros_(layer.lora_B)
    save_adapter(model, folder / "adapter0")
    (folder / "tokenizer").mkdir()
    shutil.copy(bundled_tokenizer_path("v1"), folder / "tokenizer" / "tokenizer.model")


def ours(folder: Path, kind: str, device: str, dtype: torch.dtype, adapter: str = "adapter") -> Mistral:
    """Our model of `kind` on `device`: `Mistral.from_pretrained` (+ NF4 for qlora) + `load_adapter(adapter)`."""
    model = Mistral.from_pretrained(folder / "base", dtype=dtype, quantize="nf4" if kind == "qlora" else None)
    if kind != "full":
        load_adapter(model, folder / adapter)
    return model.to(device)


def attention_implementation(device: str) -> str:
    """transformers' fastest attention here: flash-attn 2 on CUDA when installed, else SDPA."""
    return "flash_attention_2" if device == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"


def theirs(folder: Path, kind: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' MistralForCausalLM of `kind` on `device`, with the PEFT adapter for lora/qlora."""
    import transformers

    kwargs = dict(dtype=dtype, attn_implementation=attention_implementation(device))
    if kind == "qlora":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = device
    model = transformers.AutoModelForCausalLM.from_pretrained(folder / "base", **kwargs)
    if kind == "qlora" and device == "cpu":
        import bitsandbytes as bnb

        # STACK-NOTES trap 1: on AVX512-BF16 CPUs an eval-mode forward repacks the weight and later
        # training forwards silently lose the adapters' gradients.
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    if kind != "qlora":
        model.to(device)
    if kind == "full":
        return model
    import peft

    return peft.PeftModel.from_pretrained(model, folder / "adapter", is_trainable=True)


def our_optimizer(model: torch.nn.Module, device: str, lr: float = LR) -> torch.optim.Optimizer:
    """What fit() builds: AdamW over the trainable parameters (fused where supported; over bf16 weights
    trainer.bf16_update's default, Kahan summation), no weight decay."""
    spec = TrainerSpec(lr=lr, weight_decay=0.0, beta1=0.9, beta2=0.999, device=device)
    return build_optimizer(model, spec)


def their_optimizer(model: torch.nn.Module, lr: float = LR) -> torch.optim.Optimizer:
    """What transformers' Trainer builds by default on torch >= 2.8 (`adamw_torch_fused`), no weight decay;
    over bf16 weights a plain bf16 update (the Trainer has no compensated one)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0, fused=True)


def peft_config():
    """peft's LoraConfig equal to LORA, for a trainer that injects a fresh adapter itself."""
    import peft

    return peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                           target_modules=LORA["target_modules"], task_type="CAUSAL_LM")


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def serve_training_steps(forward_backward: Callable[[], float], optimizer: torch.optim.Optimizer,
                         model: torch.nn.Module, device: str) -> None:
    """Child side: serve "step" = `forward_backward()` (returns the loss) + clip 1.0 + optimizer step;
    each step answers its loss, the gradient norm before clipping and whether the trained weights moved."""
    params = trainable(model)

    def step() -> tuple[float, float]:
        loss = forward_backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss, float(norm)

    mem.serve_steps(step, device, params=params)


def lora_text() -> str:
    return (f"LoRA r {LORA['r']}, alpha {LORA['alpha']:g}, dropout {LORA['dropout']:g}, on every linear of every "
            f"layer (q, k, v, o, gate, up, down; not the LM head), lora_B ~ N(0, {LORA_B_STD}) so the adapter is live; "
            f"AdamW lr {LR}, no weight decay, clip 1.0")


def comparison_table(rows: list[tuple[str, dict, dict]], peer: str) -> list[str]:
    """Markdown rows `| workload | ours | peer | ratio |` for tokens/s and both peak-memory figures."""
    out = [f"| Workload | ours tokens/s | {peer} tokens/s | ours / {peer} | ours peak over model, MiB | {peer} | "
           f"ours / {peer} | ours absolute peak, MiB | {peer} | ours / {peer} | first-step loss ours / {peer} |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for label, ours, theirs in rows:
        cells = [label]
        for key in ("tokens_per_s", "peak_mib", "abs_peak_mib"):
            cells += [f"{ours[key]:.0f}", f"{theirs[key]:.0f}", f"{ours[key] / theirs[key]:.2f}x"]
        cells.append(f"{ours['first_loss']:.5f} / {theirs['first_loss']:.5f}")
        out.append("| " + " | ".join(cells) + " |")
    return out
