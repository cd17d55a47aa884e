"""Where metrics go: `metrics.jsonl` always, the trackers the run names (see trackers.py), a tqdm bar; what a
step measures (`Meter`: throughput, padding share, first and last loss)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

from tqdm.auto import tqdm

from mistral_train.config import TrackingSpec
from mistral_train.data.collate import padding_share
from mistral_train.tracking.trackers import SAMPLE_COLUMNS, require_tracker, start_tracker, tracker_names

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl file (a run folder or the file itself). A last line that is
    cut short (no newline, not JSON: a process killed mid-write) is dropped; any other bad line
    is an error naming the file and line."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if line_no == len(lines) and not line.endswith("\n"):
                break
            raise ValueError(f"{path}:{line_no}: invalid JSON ({err.msg})") from None
    return rows


def _plain(value: Any) -> Any:
    """JSON-safe value: tensors and numpy scalars become Python numbers; NaN/inf become null."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


EXPERT_LOAD_PREFIX = "expert_tokens"  # expert_tokens/L/E: tokens routed to expert E of MoE layer L in one step


def expert_load_metrics(load: Any) -> dict[str, float]:
    """A step's (layers, experts) tokens per expert as flat metrics, `expert_tokens/{layer}/{expert}`, so every
    tracker logs them as numbers (and groups them under one prefix)."""
    return {f"{EXPERT_LOAD_PREFIX}/{layer}/{expert}": float(count)
            for layer, counts in enumerate(load.tolist()) for expert, count in enumerate(counts)}


def format_samples(samples: list[dict[str, Any]]) -> str:
    """Generation samples as readable text, one block per sample."""
    return "\n\n".join("\n".join(f"{key}: {sample.get(key)}" for key in SAMPLE_COLUMNS) for sample in samples)


class MetricsLogger:
    """Writes one JSON object per logged step to `run_dir/metrics.jsonl`, flushed per line,
    and forwards the same values to the trackers `spec` names.

    Args:
        run_dir: the run folder (trackers write under it: `wandb/`, `tensorboard/`, `mlruns/`).
        spec: which trackers are on.
        config: the resolved run configuration, recorded by the trackers.
        resume_step: when resuming, rows logged after this step by the interrupted run are
            dropped so the file reads as one uninterrupted run; None starts a new file.
        enabled: pass `accelerator.is_main_process`: other processes write nothing and start no tracker.
    """

    def __init__(self, run_dir: str | os.PathLike, spec: Optional[TrackingSpec] = None,
                 config: Optional[dict[str, Any]] = None, resume_step: Optional[int] = None,
                 enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.spec = spec or TrackingSpec()
        self.enabled = enabled
        self._file = None
        self.trackers: dict[str, Any] = {}
        names = tracker_names(self.spec)  # a misspelt name fails on every process, before anything is written
        if not enabled:
            return
        for name in names:  # a missing package fails before metrics.jsonl is touched
            require_tracker(name)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS_FILE
        kept = []
        if resume_step is not None and path.exists():
            kept = [row for row in read_metrics(path) if row.get("step", 0) <= resume_step]
        self._file = path.open("w", encoding="utf-8")
        self._file.writelines(json.dumps(row) + "\n" for row in kept)
        self._file.flush()
        for name in names:
            self.trackers[name] = start_tracker(name, self.run_dir, self.spec, config, resume_step is not None)

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Record `metrics` at optimizer step `step` (1-based); return the row written.
        Numbers go to every tracker; strings are text (TensorBoard text, wandb/mlflow text)."""
        row = {"step": int(step), **{key: _plain(value) for key, value in metrics.items()}}
        if not self.enabled:
            return row
        self._write(row)
        numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        texts = {k: v for k, v in row.items() if isinstance(v, str)}
        for tracker in self.trackers.values():
            if numbers:
                tracker.log(numbers, step=int(step))
            for key, text in texts.items():
                tracker.log_text(key, text, int(step))
        return row

    def log_samples(self, step: int, samples: list[dict[str, Any]], key: str = "eval_samples") -> dict[str, Any]:
        """Record generation samples (dicts with prompt/answer/prediction): as one text field in
        metrics.jsonl, a table in wandb, text elsewhere. Returns the row written."""
        row = {"step": int(step), key: format_samples(samples)}
        if not self.enabled or not samples:
            return row
        self._write(row)
        for tracker in self.trackers.values():
            tracker.log_samples(key, samples, row[key], int(step))
        return row

    def _write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for tracker in self.trackers.values():
            tracker.finish()
        self.trackers = {}

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Meter:
    """Throughput over training steps only (evaluation and checkpoint writes excluded) and the padding
    share, both averaged over the steps since the last log row; the first and last loss of the run."""

    def __init__(self) -> None:
        self.began, self.first_loss, self.last_loss = time.perf_counter(), None, math.nan
        self.tokens, self.seconds, self.shares = 0, 0.0, []

    def add(self, drawn: list[dict[str, Any]], seconds: float, loss: float) -> float:
        """Count one step (every batch drawn, over all processes); return its tokens per second."""
        n_inputs = sum(batch["input_ids"].numel() for batch in drawn)
        self.tokens, self.seconds = self.tokens + n_inputs, self.seconds + seconds
        self.shares += [padding_share(b) for b in drawn if "attention_mask" in b or "pad_mask" in b]
        self.first_loss = loss if self.first_loss is None else self.first_loss
        self.last_loss = loss
        return n_inputs / seconds

    def row(self, epoch: float) -> dict[str, float]:
        """tokens_per_s, epoch and padding_share (when batches carry padding) since the last row; restart."""
        row = {"tokens_per_s": self.tokens / self.seconds, "epoch": epoch}  # epoch: items served / items per epoch
        if self.shares:
            row["padding_share"] = sum(self.shares) / len(self.shares)
        self.tokens, self.seconds, self.shares = 0, 0.0, []
        return row


def progress_bar(total: int, initial: int = 0, enabled: bool = True) -> tqdm:
    """The training bar (steps), with loss, lr and tokens/s set as its postfix by the loop."""
    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)
