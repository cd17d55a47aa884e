"""Curves of a run: `metrics.jsonl` -> `loss.png`.

Top panel: train loss and eval loss against step, learning rate on a second axis. A second
panel shows held-out exact match when the run logged one. Missing keys, nulls, NaN and
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

from mistral_train.tracking import METRICS_FILE, read_metrics

PLOT_FILE = "loss.png"


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


def draw_run(rows: list[dict[str, Any]], title: str = "") -> Figure:
    """The figure of a run's metric rows (see the module docstring).

    Raises:
        ValueError: no row has a finite loss or eval_loss.
    """
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
        ax.plot(steps, loss, label="train loss", color="tab:blue")
    if eval_steps:
        ax.plot(eval_steps, eval_loss, "o-", label="eval loss", color="tab:orange")
    ax.set_ylabel("cross-entropy (nats/token)")
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


def plot_run(run_dir: str | os.PathLike, out: Optional[str | os.PathLike] = None) -> Path:
    """Draw `run_dir/metrics.jsonl` (see `draw_run`) to a PNG.

    Args:
        run_dir: a run folder holding metrics.jsonl.
        out: where to write the PNG; default `run_dir/loss.png`.
    Returns:
        The path of the PNG written.
    """
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / METRICS_FILE)
    try:
        figure = draw_run(rows, title=run_dir.name)
    except ValueError as err:
        raise ValueError(f"{run_dir / METRICS_FILE}: {err}") from None
    path = Path(out) if out is not None else run_dir / PLOT_FILE
    figure.savefig(path)
    return path
