"""What data/ is given: the data group's schema (`DataSpec`, registered by config.py with Hydra) and the
trainer's settings that batching needs, as one value (`Batching`). data/ reads no other configuration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class DataSpec:
    """Where the training rows come from and how they are read."""

    path: Any = None  # a file, a folder or a list of them; None means the data bundled with the package
    # text (pretraining) | messages | alpaca | sharegpt | prompt_completion | auto (decided per source
    # from the first row's fields, and reported)
    format: str = "text"
    weights: Optional[list[float]] = None  # mixing weights, one per entry of `path`
    field_map: dict[str, str] = field(default_factory=dict)  # our field name -> the name in the files
    streaming: bool = False  # read files lazily (larger than memory) through `datasets` streaming
    stream_buffer: int = 2000  # streaming: rows tokenized, packed and shuffled together (data/stream.py)
    eval_path: Any = None  # a separate held-out file/folder; else `eval_fraction` of the rows
    eval_fraction: float = 0.0  # share of rows held out for evaluation
    chat_format: Optional[str] = None  # v1 | v2 | v3; None: the tokenizer's own
    train_on: str = "assistant"  # assistant (every assistant turn) | last_assistant | all
    overlong: str = "truncate"  # truncate | drop: what happens to examples longer than max_seq_len
    packing: bool = True  # best-fit packing with per-document attention; false pads each example
    neftune_alpha: Optional[float] = None  # NEFTune embedding noise during SFT; None: off
    max_prompt_len: Optional[int] = None  # preference pairs: cap on prompt tokens (its end is kept); None: max_seq_len // 2 floor
    identical_pairs: str = "warn"  # preference pairs whose chosen == rejected: warn (counted, kept) | error
    # resume when a training file changed since the checkpoint (size or content, data/fingerprint.py): refuse | allow
    changed_data: str = "refuse"


@dataclass(frozen=True)
class Batching:
    """How items become batches: the trainer's settings data/ needs, which always travel together.
    `pad_id` is only what padding is filled with (`pad_id_of`; padding is located by place); `eval_size` items
    make a held-out batch; `padded_only`: the objective pools each row's last token, so packing is refused."""

    packing: bool  # data.packing
    max_seq_len: int
    pad_id: int
    batch_size: int
    seed: int = 0
    eval_size: int = 1
    padded_only: bool = False
    group_size: int = 1  # completions generated per prompt (grpo/rloo: trainer.grpo.num_generations)


def pad_id_of(tokenizer) -> int:
    """The id padding is filled with: the tokenizer's pad id, else EOS (padding is located by place)."""
    return tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
