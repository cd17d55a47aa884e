"""What can be checked about a run before any data is read or model built, checked first.

`fit()` calls `preflight(cfg)` before anything else, so a wrong `model.path`, an unknown `data.format`
or `trainer.device=cuda` on a machine without CUDA stops the run in a second with one line, not after
minutes of reading and tokenizing. A staged recipe is checked stage by stage; a stage's model or
adapter that an earlier stage will write (inside the run's own folder) is checked when that stage starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from mistral_train.config import RunConfig
from mistral_train.errors import ConfigError
from mistral_train.data.formats import FORMATS
from mistral_train.data.sft import OVERLONG, TRAIN_ON
from mistral_train.dist.accelerator import DEVICES
from mistral_train.dist.strategy import ACCELERATE_PRECISION, STRATEGIES
from mistral_train.folders import check_adapter_folder, check_model_folder
from mistral_train.train.resume import SAVE_FAILURES, resolve_resume
from mistral_train.train.model_setup import ADAPTER_KINDS, DTYPES
from mistral_train.train.objectives import OBJECTIVES
from mistral_train.train.optim import OPTIMIZERS
from mistral_train.train.stages import stage_configs

_RESUME_FOUND = ("true", "latest")  # resume values that find their checkpoint themselves (or start afresh)


def preflight(cfg: RunConfig) -> None:
    """Check `cfg` (every stage of a staged recipe) without reading data or weights.

    Raises:
        ConfigError: a model/adapter path that is missing or of the wrong kind, an unknown data.format, an
            adapter without a base, trainer.device=cuda without CUDA (stage errors start `stages.NAME: `).
        FileExistsError: the run folder already holds checkpoints and no resume was asked for.
        FileNotFoundError: resume=PATH is not a checkpoint folder.
    """
    if not cfg.stages:
        check_stage(cfg)
        return
    home = Path(cfg.run.dir) / cfg.run.name
    for name, stage in stage_configs(cfg):  # stage names and sections: checked by stage_configs
        try:
            check_stage(stage, written_by_run=home)
        except ConfigError as err:
            raise ConfigError(f"stages.{name}: {err}") from err


def _choices(cfg: RunConfig) -> list[tuple[str, object, tuple]]:
    t = cfg.trainer
    return [("trainer.objective", t.objective, tuple(OBJECTIVES)), ("trainer.optimizer", t.optimizer, OPTIMIZERS),
            ("trainer.precision", t.precision, tuple(ACCELERATE_PRECISION)), ("trainer.device", t.device, DEVICES),
            ("trainer.strategy", t.strategy, STRATEGIES), ("trainer.save_failure", t.save_failure, SAVE_FAILURES),
            ("trainer.compile", str(t.compile).lower(), ("auto", "true", "false")),
            ("model.dtype", cfg.model.dtype, tuple(DTYPES)), ("adapter.kind", cfg.adapter.kind, ADAPTER_KINDS),
            ("data.train_on", cfg.data.train_on, TRAIN_ON), ("data.overlong", cfg.data.overlong, OVERLONG)]


def check_stage(cfg: RunConfig, written_by_run: Optional[Path] = None) -> None:
    """One run's checks (see `preflight`); paths inside `written_by_run` are left for later."""
    def later(path: str) -> bool:  # written by an earlier stage of this run: not there yet
        return written_by_run is not None and Path(path).resolve().is_relative_to(written_by_run.resolve())

    if cfg.data.format not in (*FORMATS, "auto"):
        raise ConfigError(f"data.format={cfg.data.format} is unknown; expected one of {', '.join(FORMATS)}, auto")
    for key, value, allowed in _choices(cfg):  # the values each consumer accepts, from the consumer itself
        if value not in allowed:
            raise ConfigError(f"{key}={value} is unknown; expected one of {', '.join(map(str, allowed))}")
    reference = OBJECTIVES[cfg.trainer.objective].reference
    if reference is not None:  # e.g. DPO's reference policy, resolved against the adapter settings
        try:
            reference(cfg)
        except ValueError as err:  # a pure check of two config sections: the user's to fix
            raise ConfigError(str(err)) from err
    if cfg.adapter.kind != "none" and not cfg.model.path:
        raise ConfigError(f"adapter={cfg.adapter.kind} trains adapters on a pretrained base: set model.path to an "
                          "HF folder (a fresh random base would make the adapter meaningless)")
    if cfg.model.path and not later(cfg.model.path):
        check_model_folder(cfg.model.path)
    if cfg.adapter.path and not later(cfg.adapter.path):
        check_adapter_folder(cfg.adapter.path)
    tokenizer = cfg.model.tokenizer
    if tokenizer and not tokenizer.startswith("bundled:") and not Path(tokenizer).exists():
        raise ConfigError(f"model.tokenizer={tokenizer} does not exist; expected a tokenizer file or folder, "
                          "or bundled:v1|v2|v3")
    if cfg.trainer.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but this machine has no CUDA device (torch.cuda.is_available() is "
                          "False); use trainer.device=auto or cpu")
    resume = str(cfg.resume).lower() if cfg.resume is not None else None
    if resume not in _RESUME_FOUND:  # none: the run folder must not hold checkpoints; a path: must be one
        resolve_resume(cfg.resume, Path(cfg.run.dir) / cfg.run.name)
