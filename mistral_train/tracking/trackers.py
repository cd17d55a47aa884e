"""The trackers a run names in `tracking.trackers` (plus the `wandb`/`tensorboard` switches).

wandb (offline unless asked), TensorBoard and MLflow (a file store under the run folder) have
thin wrappers of ours, so they need no Accelerate process state and every default is offline.
The other names Accelerate knows (aim, comet_ml, ...) go through Accelerate's own tracker
classes, which read the process state of the `Accelerator` the loop has created.
Tracker packages are imported only when a run names them. Every tracker has the same four
methods: log(numbers, step), log_text(key, text, step), log_samples(key, samples, text, step), finish().
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import secrets
from html import escape
from pathlib import Path
from typing import Any, Optional

from mistral_train.config import TrackingSpec

SAMPLE_COLUMNS = ("prompt", "answer", "prediction")
# tracker name -> the module whose import tells whether it is installed (pip package in messages)
_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard", "mlflow": "mlflow", "aim": "aim", "comet_ml": "comet_ml",
             "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}


def tracker_names(spec: TrackingSpec) -> list[str]:
    """`spec.trackers` plus the `wandb`/`tensorboard` switches, checked and without repeats."""
    wanted = [*spec.trackers, *(["wandb"] if spec.wandb else []), *(["tensorboard"] if spec.tensorboard else [])]
    if not wanted:
        return []
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS  # also lists trackers registered with Accelerate

    known = sorted(LOGGER_TYPE_TO_CLASS)
    names: list[str] = []
    for raw in wanted:
        name = str(raw).strip().lower()
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ValueError(f"tracking.trackers: unknown tracker {raw!r}; expected any of {', '.join(known)}")
        if name not in names:
            names.append(name)
    return names


def require_tracker(name: str) -> None:
    """Raise ImportError naming the package when tracker `name`'s package is not installed."""
    module = "torch.utils.tensorboard" if name == "tensorboard" else _PACKAGES.get(name)
    if module is None:
        return  # a tracker registered with Accelerate by the user: its class imports what it needs
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"tracking.trackers names {name!r}, which needs the `{_PACKAGES[name]}` package; "
                          f"it is not installed (pip install {_PACKAGES[name]})") from err


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; values that are not bool/int/float/str become JSON text."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return out


def start_tracker(name: str, run_dir: Path, spec: TrackingSpec, config: Optional[dict], resume: bool):
    """Start tracker `name` (checked by `tracker_names`) for the run in `run_dir`."""
    if name == "wandb":
        return _WandB(run_dir, spec, config, resume)
    if name == "tensorboard":
        return _TensorBoard(run_dir, config)
    if name == "mlflow":
        return _MLflow(run_dir, spec, config, resume)
    return _Accelerate(name, run_dir, spec, config)


class _TextSamples:
    """Trackers without tables log samples as the text block."""

    def log_samples(self, key: str, samples: list[dict], text: str, step: int) -> None:
        self.log_text(key, text, step)


class _WandB:
    """wandb under run_dir/wandb/, offline unless WANDB_MODE or tracking.wandb_mode say otherwise.
    The run id is kept in run_dir/wandb/run_id so a resumed run continues the same wandb run."""

    def __init__(self, run_dir: Path, spec: TrackingSpec, config: Optional[dict], resume: bool):
        import wandb

        id_file = run_dir / "wandb" / "run_id"
        id_file.parent.mkdir(parents=True, exist_ok=True)
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else secrets.token_hex(6)
        id_file.write_text(run_id + "\n")
        # WANDB_MODE in the environment wins (wandb's own convention), so a user can go online
        # without editing a recipe; otherwise the recipe's mode, offline by default.
        mode = os.environ.get("WANDB_MODE") or spec.wandb_mode
        self.wandb = wandb
        self.run = wandb.init(project=spec.wandb_project, name=run_dir.name, dir=str(run_dir), mode=mode,
                              config=config, id=run_id, resume="allow", reinit="finish_previous")

    def log(self, numbers: dict, step: int) -> None:
        self.run.log(numbers, step=step)

    def log_text(self, key: str, text: str, step: int) -> None:
        self.run.log({key: self.wandb.Html(f"<pre>{escape(text)}</pre>")}, step=step)

    def log_samples(self, key: str, samples: list[dict], text: str, step: int) -> None:
        table = self.wandb.Table(columns=list(SAMPLE_COLUMNS), data=[[s.get(c) for c in SAMPLE_COLUMNS] for s in samples])
        self.run.log({key: table}, step=step)

    def finish(self) -> None:
        self.run.finish()


class _TensorBoard(_TextSamples):
    """Event files in run_dir/tensorboard/; text as TensorBoard text (markdown, so kept in a code block)."""

    def __init__(self, run_dir: Path, config: Optional[dict]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if config:
            self.writer.add_text("config", f"```\n{json.dumps(config, indent=2)}\n```", global_step=0)

    def log(self, numbers: dict, step: int) -> None:
        for key, value in numbers.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def log_text(self, key: str, text: str, step: int) -> None:
        self.writer.add_text(key, "\n".join("    " + line for line in text.splitlines()), global_step=step)
        self.writer.flush()

    def finish(self) -> None:
        self.writer.close()


class _MLflow(_TextSamples):
    """An MLflow run stored under run_dir (MLFLOW_TRACKING_URI in the environment wins): a SQLite
    database run_dir/mlflow.db with full mlflow, the file store run_dir/mlruns/ with mlflow-skinny
    (which lacks SQLAlchemy); artifacts (config, text) in run_dir/mlartifacts/. The experiment is
    `tracking.wandb_project`, the run name the run folder's; a resumed run continues its MLflow run."""

    def __init__(self, run_dir: Path, spec: TrackingSpec, config: Optional[dict], resume: bool):
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            if importlib.util.find_spec("sqlalchemy") is not None:  # mlflow 3 deprecates the file store
                mlflow.set_tracking_uri(f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
            else:
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the only local store skinny has
                mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
        experiment = mlflow.get_experiment_by_name(spec.wandb_project)
        experiment_id = experiment.experiment_id if experiment else mlflow.create_experiment(
            spec.wandb_project, artifact_location=(run_dir / "mlartifacts").resolve().as_uri())
        id_file = run_dir / "mlflow_run_id"  # so a resumed run continues the same MLflow run
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        self.run = mlflow.start_run(run_id=run_id, experiment_id=experiment_id, run_name=run_dir.name)
        id_file.write_text(self.run.info.run_id + "\n")
        if config:
            mlflow.log_dict(config, "config.json")

    def log(self, numbers: dict, step: int) -> None:
        self.mlflow.log_metrics({k: float(v) for k, v in numbers.items()}, step=step)

    def log_text(self, key: str, text: str, step: int) -> None:
        self.mlflow.log_text(text, f"{key}/step_{step:07d}.txt")

    def finish(self) -> None:
        self.mlflow.end_run()


class _Accelerate(_TextSamples):
    """Any other tracker Accelerate knows, through its own class (as `Accelerator.init_trackers`
    builds them); needs the process state of an `Accelerator` (or `PartialState`) created before."""

    def __init__(self, name: str, run_dir: Path, spec: TrackingSpec, config: Optional[dict]):
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        cls = LOGGER_TYPE_TO_CLASS[name]
        kwargs = {"logging_dir": str(run_dir / name)} if cls.requires_logging_directory else {}
        self.tracker = cls(spec.wandb_project, **kwargs)
        self.tracker.start()
        if config:
            self.tracker.store_init_configuration(_flat(config))

    def log(self, numbers: dict, step: int) -> None:
        self.tracker.log(numbers, step=step)

    def log_text(self, key: str, text: str, step: int) -> None:
        self.tracker.log({key: text}, step=step)

    def finish(self) -> None:
        self.tracker.finish()
