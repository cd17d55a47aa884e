"""Staged recipes: several runs in a row, each starting from the model the one before it wrote.

A recipe with `stages` (RunConfig.stages, a mapping in run order) runs one fit() per stage:
- stage NAME's configuration is the recipe's own settings with the stage's section merged over
  them, checked against the schema (a misspelt key in a section fails before any training);
- it runs in `{run.dir}/{run.name}/NAME` (its own config.yaml, metrics.jsonl, final/, ...);
- every stage after the first starts from the previous stage's `final/` folder (weights and
  tokenizer) unless its section sets `model.path`; after an adapter stage, a stage with an adapter
  keeps the base and continues the adapter (`adapter.path`), see `_continue_from`.
A stage marked `if_no_model: true` runs only when the command line (or recipe) gives no `model.path`:
given one, the stage is left out and the next stage starts from that model (so `recipe=tiny_dpo
model.path=runs/.../sft/final` skips the pretraining and SFT that would otherwise produce it).
Overrides on the command line change the recipe's own settings, so they reach every stage that
does not set the same key in its section; `stages.NAME.KEY=VALUE` changes one stage.
`resume=latest` (or true) skips the stages that finished (their final/ exists) and resumes the
interrupted one from its newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mistral_train.config import ConfigError, RunConfig, dump_run_config
from mistral_train.config_checks import describe_error

_NOT_IN_STAGES = ("run", "stages", "resume")  # decided by the staged recipe as a whole
IF_NO_MODEL = "if_no_model"  # a stage marked `if_no_model: true` runs only when model.path is not given


def stage_configs(cfg: RunConfig) -> list[tuple[str, RunConfig]]:
    """(name, configuration) of each stage, in order; `model.path` of a later stage defaults to the
    previous stage's final/ folder.

    Raises:
        ConfigError: a section that is not a mapping, sets run/stages/resume, or has an unknown key
            or a value of the wrong type; resume=PATH (one checkpoint cannot resume several runs).
    """
    if cfg.resume is not None and cfg.resume.lower() not in ("true", "latest"):
        raise ConfigError(f"resume={cfg.resume!r}: a staged recipe resumes with resume=latest (each stage "
                          "continues from its own newest checkpoint), not from one checkpoint folder")
    base = dataclasses.replace(cfg, stages={})
    home = Path(cfg.run.dir) / cfg.run.name
    out, previous = [], None
    for name, section in cfg.stages.items():
        if not isinstance(section, dict):
            raise ConfigError(f"stages.{name}: expected a mapping of settings (e.g. {{trainer: {{max_steps: 10}}}}), "
                              f"got {section!r}")
        section = dict(section)
        if section.pop(IF_NO_MODEL, False) and cfg.model.path:
            continue  # the model the user gave stands in for what this stage would have trained
        bad = [key for key in section if key in _NOT_IN_STAGES]
        if bad:
            raise ConfigError(f"stages.{name}.{bad[0]}: set by the staged recipe as a whole, not per stage")
        try:
            merged = OmegaConf.merge(OmegaConf.structured(base), section)
            stage = OmegaConf.to_object(merged)
        except OmegaConfBaseException as err:
            raise ConfigError(f"stages.{name}: {describe_error(err, RunConfig)}") from err
        stage.run = dataclasses.replace(stage.run, dir=str(home), name=str(name))
        if previous is not None:
            _continue_from(stage, section, out[-1][1], home / previous, name)
        out.append((str(name), stage))
        previous = str(name)
    return out


def _continue_from(stage: RunConfig, section: dict, before: RunConfig, before_dir: Path, name: str) -> None:
    """Point `stage` at what the stage before it wrote, for the keys its section leaves unset.

    A full model before: its final/ is the next base. An adapter before: the base stays the one it
    was trained on, and a stage with an adapter continues that adapter (adapter.path); a full
    fine-tuning stage after it starts from its merged/ folder (adapter.merge_at_end)."""
    sets_model = "path" in section.get("model", {})
    if before.adapter.kind == "none":
        if not sets_model:
            stage.model = dataclasses.replace(stage.model, path=str(before_dir / "final"))
        return
    if stage.adapter.kind != "none":
        if not sets_model:
            stage.model = dataclasses.replace(stage.model, path=before.model.path)
        if "path" not in section.get("adapter", {}):
            stage.adapter = dataclasses.replace(stage.adapter, path=str(before_dir / "final"))
    elif not sets_model:
        if not before.adapter.merge_at_end:
            raise ConfigError(f"stages.{name}: trains every weight after an adapter stage; set adapter.merge_at_end=true "
                              "in the stage before (its merged/ folder is then this stage's model), or set model.path")
        stage.model = dataclasses.replace(stage.model, path=str(before_dir / "merged"))


def run_stages(cfg: RunConfig, fit: Callable[[RunConfig], Path]) -> Path:
    """Run every stage with `fit` (a stage's config has no stages); return `{run.dir}/{run.name}`,
    which holds the recipe's config.yaml and one folder per stage."""
    stages = stage_configs(cfg)
    if not stages:
        raise ConfigError("run_stages: the recipe has no stages")
    home = Path(cfg.run.dir) / cfg.run.name
    dump_run_config(cfg, home / "config.yaml")
    resuming = cfg.resume is not None
    for name, stage in stages:
        stage_dir = Path(stage.run.dir) / stage.run.name
        if resuming and (stage_dir / "final" / "config.json").is_file():
            print(f"== stage {name}: finished earlier ({stage_dir / 'final'}); skipped")
            continue
        print(f"== stage {name}: {stage_dir}")
        fit(stage)
    print(summarize(home, [name for name, _ in stages]))
    return home


def summarize(home: Path, names: list[str]) -> str:
    """One line per stage: first and last logged loss, eval loss and exact match."""
    from mistral_train.tracking import read_metrics

    lines = []
    for name in names:
        rows = read_metrics(home / name) if (home / name / "metrics.jsonl").is_file() else []
        parts = [f"{key} {_first(rows, key):.3f} -> {_last(rows, key):.3f}"
                 for key in ("loss", "eval_loss", "exact_match") if _last(rows, key) is not None]
        lines.append(f"stage {name}: " + ("; ".join(parts) if parts else "nothing logged"))
    return "\n".join(lines)


def _values(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def _first(rows: list[dict], key: str) -> Optional[float]:
    values = _values(rows, key)
    return values[0] if values else None


def _last(rows: list[dict], key: str) -> Optional[float]:
    values = _values(rows, key)
    return values[-1] if values else None
