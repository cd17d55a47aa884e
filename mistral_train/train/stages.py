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
Command-line overrides win over the sections, each written into the sections of the stages it is meant
for (train/stage_overrides.py says which); `stages.NAME.KEY=VALUE` changes one stage and wins over both.
Before anything is written, `run_stages` reads the first row of every stage's data and refuses data
of a kind the stage's objective does not train on; each stage then prints where its data and its
starting model come from. A run whose first stage fails before writing its folder leaves no run folder.
`resume=latest` (or true) skips the stages that finished (their final/ exists) and resumes the
interrupted one from its newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mistral_train.config import RunConfig, dump_run_config
from mistral_train.errors import ConfigError
from mistral_train.config_checks import describe_error
from mistral_train.data.formats import KIND_NAMES, format_kind, resolve_format

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
    which holds the recipe's config.yaml and one folder per stage.

    Raises:
        ConfigError: (before anything is written) a stage whose data is missing, unreadable at its
            first row, or of a kind its objective does not train on.
    """
    stages = stage_configs(cfg)
    if not stages:
        raise ConfigError("run_stages: the recipe has no stages")
    home = Path(cfg.run.dir) / cfg.run.name
    resuming = cfg.resume is not None
    finished = lambda stage: resuming and (Path(stage.run.dir) / stage.run.name / "final" / "config.json").is_file()  # noqa: E731
    origins = {name: stage_origins(name, stage, home) for name, stage in stages if not finished(stage)}
    created = not home.exists()
    dump_run_config(cfg, home / "config.yaml")
    try:
        for name, stage in stages:
            stage_dir = Path(stage.run.dir) / stage.run.name
            if name not in origins:
                print(f"== stage {name}: finished earlier ({stage_dir / 'final'}); skipped")
                continue
            print(f"== stage {name}: {stage_dir}\n" + "\n".join(origins[name]))
            fit(stage)
    except BaseException:
        if created:  # bad data in the first stage: the run wrote nothing but our config.yaml
            _remove_if_bare(home)
        raise
    print(summarize(home, [name for name, _ in stages]))
    return home


def stage_origins(name: str, stage: RunConfig, home: Path) -> list[str]:
    """Where stage `name`'s data and starting model come from, as printed before it trains; reads the
    first row of each data file.

    Raises:
        ConfigError: the data is missing, unreadable at its first row, or of another kind than the
            stage's objective trains on (train/objectives.py: check_data_kind).
    """
    try:
        data = data_origin(stage)
    except (ValueError, OSError) as err:
        raise ConfigError(f"stage {name}: {err}") from err
    return [f"   data:  {data}", f"   model: {_model_origin(stage, home)}"]


def data_origin(cfg: RunConfig) -> str:
    """"data.path FILE: chat rows (format sharegpt, decided from its first row)" for `cfg`'s training data.

    Raises:
        ValueError, OSError: the data is missing, unreadable at its first row, or of a kind that
            `cfg.trainer.objective` does not train on.
    """
    from mistral_train.data.sources import source_formats  # here: the data stack is slow to import
    from mistral_train.train.objectives import check_data_kind, objective_entry  # here: it imports the steps

    spec, objective = cfg.data, cfg.trainer.objective
    fmt = resolve_format(spec.format, spec.path, objective_entry(objective).data_kind)
    name, formats = source_formats(dataclasses.replace(spec, format=fmt))
    kinds = sorted({format_kind(f) for f in formats.values()})  # a mix is load_splits' to refuse, by file
    for kind in kinds:
        check_data_kind(objective, kind, name)
    found = ", ".join(sorted(set(formats.values())))
    how = ("decided from the first row of each file" if spec.format == "auto" and spec.path is not None
           else "for the bundled data" if spec.path is None else "data.format")
    return f"{name}: {' and '.join(KIND_NAMES[k] for k in kinds)} (format {found}, {how})"


def _model_origin(stage: RunConfig, home: Path) -> str:
    path, m = stage.model.path, stage.model
    if path is None:
        text = f"a fresh model ({m.num_hidden_layers} layers, hidden size {m.hidden_size}: the model.* shape)"
    elif Path(path).parent.parent == home:
        text = f"{path} (what stage {Path(path).parent.name} wrote)"
    else:
        text = f"{path} (model.path)"
    if stage.adapter.kind != "none":
        text += f"; {stage.adapter.kind} adapter: " + (f"continues {stage.adapter.path}" if stage.adapter.path else "fresh")
    return text


def _remove_if_bare(home: Path) -> None:
    """Remove `home` when it holds only the config.yaml run_stages wrote (no stage folder)."""
    entries = list(home.iterdir()) if home.is_dir() else []
    if [e.name for e in entries] == ["config.yaml"]:
        entries[0].unlink()
        home.rmdir()


# The before/after table's columns: (metrics.jsonl key, title, decimals). Held-out metrics are "before ->
# after": step 0 (logged with trainer.eval_before_training) -> the stage's last evaluation; the train loss
# is first -> last logged step.
_TABLE = (("loss", "train loss", 3), ("eval_loss", "held-out loss", 3), ("exact_match", "held-out exact match", 2),
          ("eval_rewards/accuracies", "held-out preference accuracy", 2), ("eval_accuracy", "held-out accuracy", 2))


def summarize(home: Path, names: list[str]) -> str:
    """The before/after table of a staged run, one row per stage and one column per metric some stage
    logged ("-" where a stage has none, or no step-0 evaluation for "before"), then the last stage's
    sample (its sample.txt: the greedy reply to trainer.sample_prompt)."""
    from mistral_train.tracking.metrics import read_metrics

    table = [["stage", *(title for _, title, _ in _TABLE)]]
    for name in names:
        rows = read_metrics(home / name) if (home / name / "metrics.jsonl").is_file() else []
        cells = [name]
        for key, _, decimals in _TABLE:
            logged = [(r.get("step"), r[key]) for r in rows if _values([r], key)]
            if not logged:
                cells.append("-")
                continue
            first_step, before = logged[0]
            if key != "loss" and first_step != 0:
                before = None  # evaluated only at the end: no "before" to show
            cells.append(f"{'-' if before is None else f'{before:.{decimals}f}'} -> {logged[-1][1]:.{decimals}f}")
        table.append(cells)
    shown = [0] + [c for c in range(1, len(table[0])) if any(row[c] != "-" for row in table[1:])]
    widths = [max(len(row[c]) for row in table) for c in shown]
    lines = ["  ".join(row[c].ljust(w) for c, w in zip(shown, widths)).rstrip() for row in table]
    for name in reversed(names):
        sample = home / name / "sample.txt"
        if sample.is_file():
            lines.append(f"sample ({name}): {sample.read_text(encoding='utf-8').strip()}")
            break
    return "\n".join(lines)


def _values(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
