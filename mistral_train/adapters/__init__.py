"""Parameter-efficient fine-tuning: LoRA (rsLoRA, DoRA, PiSSA init) injected by module name,
merged, disabled (the DPO reference policy), and saved/loaded in PEFT's on-disk format.

    cfg = LoraConfig(r=16, alpha=32, target_modules="all-linear")
    apply_lora(model, cfg)                  # in place; only adapters train
    save_adapter(model, "out/adapter")      # PeftModel.from_pretrained loads it
    with disable_adapters(model): ...       # exactly the base model
"""

from mistral_train.adapters.inject import (
    TrainableCopy,
    apply_lora,
    disable_adapters,
    find_targets,
    lora_layers,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)
from mistral_train.adapters.lora import LoraConfig, LoRALinear
from mistral_train.adapters.peft_format import (
    load_adapter,
    load_adapter_weights,
    peft_state_dict,
    read_adapter_config,
    save_adapter,
    write_adapter_files,
)

__all__ = [
    "LoraConfig",
    "LoRALinear",
    "TrainableCopy",
    "apply_lora",
    "find_targets",
    "lora_layers",
    "merge_lora",
    "unmerge_lora",
    "merge_and_unload",
    "disable_adapters",
    "save_adapter",
    "write_adapter_files",
    "load_adapter",
    "load_adapter_weights",
    "read_adapter_config",
    "peft_state_dict",
]
