"""Where metrics go: `metrics.jsonl` always; wandb and TensorBoard when enabled; a tqdm bar.

wandb and TensorBoard are optional extras, imported only when a run enables them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from tqdm.auto import tqdm

from mistral_train.config import TrackingSpec

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl file (a run folder or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({err.msg})") from None
    return rows


def _plain(value: Any) -> Any:
    """JSON-safe number: tensors and numpy scalars become Python floats; NaN/inf become null."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Writes one JSON object per logged step to `run_dir/metrics.jsonl`, flushed per line,
    and forwards the same numbers to wandb / TensorBoard when `spec` enables them.

    Args:
        run_dir: the run folder (trackers write under it: `wandb/`, `tensorboard/`).
        spec: which trackers are on.
        config: the resolved run configuration, recorded by wandb.
        resume_step: when resuming, rows logged after this step by the interrupted run are
            dropped so the file reads as one uninterrupted run; None starts a new file.
        enabled: False on non-main processes (nothing is written).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        spec: Optional[TrackingSpec] = None,
        config: Optional[dict[str, Any]] = None,
        resume_step: Optional[int] = None,
        enabled: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.spec = spec or TrackingSpec()
        self.enabled = enabled
        self._file = self._wandb = self._tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS_FILE
        kept = []
        if resume_step is not None and path.exists():
            kept = [row for row in read_metrics(path) if row.get("step", 0) <= resume_step]
        self._file = path.open("w", encoding="utf-8")
        for row in kept:
            self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.spec.wandb:
            self._wandb = _start_wandb(self.run_dir, self.spec, config, resume=resume_step is not None)
        if self.spec.tensorboard:
            self._tb = _start_tensorboard(self.run_dir)

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Record `metrics` at optimizer step `step` (1-based); return the row written."""
        row = {"step": int(step), **{key: _plain(value) for key, value in metrics.items()}}
        if not self.enabled:
            return row
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self._wandb is not None:
            self._wandb.log(numbers, step=int(step))
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, global_step=int(step))
        return row

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _start_wandb(run_dir: Path, spec: TrackingSpec, config: Optional[dict], resume: bool):
    try:
        import wandb
    except ImportError as err:
        raise ImportError(
            "tracking.wandb=true needs the `wandb` package: pip install 'mistral-train[tracking]'"
        ) from err
    # WANDB_MODE in the environment wins (wandb's own convention), so a user can go online
    # without editing a recipe; otherwise the recipe's mode, offline by default.
    mode = os.environ.get("WANDB_MODE") or spec.wandb_mode
    return wandb.init(
        project=spec.wandb_project,
        name=run_dir.name,
        dir=str(run_dir),
        mode=mode,
        config=config,
        resume="allow" if resume else None,
        reinit="finish_previous",
    )


def _start_tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError(
            "tracking.tensorboard=true needs the `tensorboard` package: pip install 'mistral-train[tracking]'"
        ) from err
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def progress_bar(total: int, initial: int = 0, enabled: bool = True) -> tqdm:
    """The training bar (steps), with loss, lr and tokens/s set as its postfix by the loop."""
    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)
