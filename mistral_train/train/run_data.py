"""The run's data: the run config turned into the plain values data/ takes (its DataSpec, a `Batching`, the
kind the objective reads), then read, tokenized, audited and batched (data/batches.py). fit() and
`mistral-train audit` both read their data here, so they see the same batches."""

from __future__ import annotations

from dataclasses import replace

from mistral_train.config import RunConfig
from mistral_train.data.batches import build_batches
from mistral_train.data.epochs import TrainData
from mistral_train.data.fingerprint import CHANGED_DATA, fingerprint
from mistral_train.data.formats import resolve_format
from mistral_train.data.sources import load_splits
from mistral_train.data.spec import Batching, pad_id_of
from mistral_train.errors import ConfigError
from mistral_train.train.objectives import check_data_kind, objective_entry


def read_data(cfg: RunConfig, tokenizer, check: bool = True) -> TrainData:
    """The run's TrainData (data/batches.py: build_batches; `check` as there). Data of another kind than the
    objective trains on is refused naming the file (train/objectives.py: check_data_kind), never half-used."""
    spec, entry = cfg.trainer, objective_entry(cfg.trainer.objective)
    if cfg.data.changed_data not in CHANGED_DATA:
        raise ConfigError(f"data.changed_data={cfg.data.changed_data!r}: expected one of {', '.join(CHANGED_DATA)}")
    fmt = resolve_format(cfg.data.format, cfg.data.path, entry.data_kind)  # auto + bundled: the bundled data of its kind
    train, held = load_splits(replace(cfg.data, format=fmt), spec.seed)
    check_data_kind(spec.objective, train.kind, train.name)
    batching = Batching(cfg.data.packing, spec.max_seq_len, pad_id_of(tokenizer), spec.batch_size, spec.seed,
                        eval_size=spec.batch_size * spec.grad_accum_steps,  # no gradients kept: a whole window at once
                        padded_only=entry.padded_only,  # the objective table says whether its head pools each row's last token
                        group_size=spec.grpo.num_generations if entry.data_kind == "prompt" else 1)  # completions per prompt
    data = build_batches(cfg.data, batching, tokenizer, train, held, check)
    data.files = fingerprint(train.sources)  # what a checkpoint's data position counts in (train/resume.py checks it)
    return data
