"""Run configuration schema: one dataclass per Hydra config group.

The YAML files in `configs/` and `recipes/` only set values; these dataclasses are the schema.
They are registered with Hydra's ConfigStore (see `register_schemas`), so a misspelt key or a
value of the wrong type fails when the configuration is composed, naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ModelSpec:
    """The model to train: an HF folder (`path`) or a fresh model of the given shape."""

    path: Optional[str] = None  # HF Mistral folder; when set, the shape fields below are ignored
    tokenizer: str = "bundled:v1"  # a folder / file, or "bundled:v1|v2|v3" (shipped in mistral-common)
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: Optional[int] = None
    sliding_window: Optional[int] = None
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    dtype: str = "float32"  # float32 | bfloat16 | float16: the dtype the weights are kept in
    gradient_checkpointing: bool = False


@dataclass
class DataSpec:
    """Where the training rows come from and how they are read."""

    path: Optional[str] = None  # a file or folder; None means the text bundled with the package
    format: str = "text"  # text (pretraining); later issues add chat formats
    eval_fraction: float = 0.0  # share of documents held out for evaluation


@dataclass
class TrainerSpec:
    """The optimisation loop."""

    objective: str = "pretrain"
    max_steps: int = 150
    max_seq_len: int = 256
    batch_size: int = 8  # sequences per micro-batch
    grad_accum_steps: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    loss_chunk_size: int = 1024  # tokens per cross-entropy chunk
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    log_every: int = 5
    save_every: Optional[int] = None  # steps between checkpoints; None: only the final one
    keep_last: int = 2  # checkpoints kept on disk
    sample_prompt: str = "The cat"
    sample_max_new_tokens: int = 40


@dataclass
class AdapterSpec:
    """Parameter-efficient fine-tuning; `none` trains every weight."""

    kind: str = "none"


@dataclass
class TrackingSpec:
    """Where metrics go. metrics.jsonl is always written."""

    wandb: bool = False
    wandb_mode: str = "offline"
    wandb_project: str = "mistral-train"
    tensorboard: bool = False
    progress_bar: bool = True
    plot: bool = True


@dataclass
class RunSpec:
    """Where the run directory goes: `{dir}/{name}`."""

    name: str = "tiny"
    dir: str = "runs"


@dataclass
class RunConfig:
    """A complete run: what recipes compose and `fit()` consumes."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    run: RunSpec = field(default_factory=RunSpec)
    resume: Optional[str] = None  # "true"/"latest" or a checkpoint folder
