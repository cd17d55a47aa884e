"""Curves of a run: `metrics.jsonl` -> `loss.png`.

Top panel: train loss and eval loss against step, learning rate on a second axis, the loss named as
the run's objective defines it (the caller's label, read from its config.yaml by `run_objective`:
cross-entropy, or a DPO / reward-model loss per pair).
A second panel shows held-out exact match when the run logged one. Missing keys, nulls, NaN and
non-numeric values (text samples) are skipped; a step logged twice keeps its last value.
Uses matplotlib's object API with the Agg canvas directly, so plotting never needs a
display and never changes the global pyplot backend of the process that calls it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter

from mistral_train.errors import ConfigError
from mistral_train.errors import DataError
from mistral_train.tracking.metrics import METRICS_FILE, read_metrics

PLOT_FILE = "loss.png"
CONFIG_FILE = "config.yaml"  # the run's resolved configuration (config.dump_run_config)
LM_LOSS = ("loss", "cross-entropy (nats/token)")  # (curve name, y-axis label) of a language model's loss


def run_objective(run_dir: Path) -> tuple[str, object]:
    """(trainer.objective, trainer.dpo.loss_type) from the run's config.yaml; a run folder without one
    (metrics.jsonl alone) plots as a language-model run."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return "pretrain", "sigmoid"
    import yaml  # here: only plotting a run folder reads its config

    trainer = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("trainer") or {}
    return str(trainer.get("objective", "pretrain")), (trainer.get("dpo") or {}).get("loss_type", "sigmoid")


def stage_folders(run_dir: Path) -> list[str]:
    """Names of the subfolders of a staged run's folder that hold their own metrics.jsonl."""
    return sorted(p.name for p in run_dir.iterdir() if (p / METRICS_FILE).is_file()) if run_dir.is_dir() else []


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, sorted by step, over rows where it is a finite number."""
    points: dict[int, float] = {}
    for row in rows:
        step, value = row.get("step"), row.get(key)
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(step, int) and numeric and math.isfinite(value):
            points[step] = float(value)
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def draw_run(rows: list[dict[str, Any]], title: str = "", loss: tuple[str, str] = LM_LOSS) -> Figure:
    """The figure of a run's metric rows (see the module docstring); `loss`: (curve name, y-axis label)
    of its objective's loss (train/objectives.py loss_label).

    Raises:
        ValueError: no row has a finite loss or eval_loss.
    """
    name, axis_label = loss
    steps, loss = series(rows, "loss")
    eval_steps, eval_loss = series(rows, "eval_loss")
    if not steps and not eval_steps:
        raise ValueError("no row has a 'loss' or 'eval_loss' to plot")
    match_steps, match = series(rows, "exact_match")
    figure = Figure(figsize=(7, 6.5 if match_steps else 4.5), dpi=100)
    FigureCanvasAgg(figure)
    if match_steps:
        ax, match_ax = figure.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    else:
        ax, match_ax = figure.add_subplot(), None
    if steps:
        ax.plot(steps, loss, label=f"train {name}", color="tab:blue")
    if eval_steps:
        ax.plot(eval_steps, eval_loss, "o-", label=f"eval {name}", color="tab:orange")
    ax.set_ylabel(axis_label)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    lr_steps, lr = series(rows, "lr")
    if lr_steps:
        lr_ax = ax.twinx()
        lr_ax.plot(lr_steps, lr, "--", color="tab:gray", label="lr")
        lr_ax.set_ylabel("learning rate")
        lr_ax.yaxis.set_major_formatter(FormatStrFormatter("%.1e"))  # no offset text over the title
        more_handles, more_labels = lr_ax.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, loc="upper right")
    ax.set_title(title)
    if match_ax is not None:
        match_ax.plot(match_steps, match, "o-", color="tab:green", label="eval exact match")
        match_ax.set_ylim(-0.05, 1.05)  # a share: keep the scale fixed so progress is visible
        match_ax.set_ylabel("exact match")
        match_ax.grid(alpha=0.3)
        match_ax.legend(loc="lower right")
    (match_ax or ax).set_xlabel("step")
    figure.tight_layout()
    return figure


def plot_run(run_dir: str | os.PathLike, out: Optional[str | os.PathLike] = None,
             loss: tuple[str, str] = LM_LOSS) -> Path:
    """Draw `run_dir/metrics.jsonl` (see `draw_run`) to a PNG.

    Args:
        run_dir: a run folder holding metrics.jsonl (and config.yaml, which names the loss).
        out: where to write the PNG; default `run_dir/loss.png`.
        loss: (curve name, y-axis label) of the run's loss (train/objectives.py loss_label of `run_objective`).
    Returns:
        The path of the PNG written.
    Raises:
        ConfigError: `run_dir` holds no metrics.jsonl (for a staged run's folder: naming its stages).
        DataError: no row has a loss to plot.
    """
    run_dir = Path(run_dir)
    if not (run_dir / METRICS_FILE).is_file():
        stages = stage_folders(run_dir)
        if stages:
            raise ConfigError(f"{run_dir} is a staged run's folder; plot one of its stages: "
                              + ", ".join(str(run_dir / name) for name in stages))
        state = "has no " + METRICS_FILE if run_dir.is_dir() else "does not exist"
        raise ConfigError(f"{run_dir} {state}; give a run directory (runs/NAME, or runs/NAME/STAGE of a staged run)")
    rows = read_metrics(run_dir / METRICS_FILE)
    try:
        figure = draw_run(rows, title=run_dir.name, loss=loss)
    except ValueError as err:  # the metrics file, not the code, is at fault
        raise DataError(f"{run_dir / METRICS_FILE}: {err}") from None
    path = Path(out) if out is not None else run_dir / PLOT_FILE
    figure.savefig(path)
    return path
