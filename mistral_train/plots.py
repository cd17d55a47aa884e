"""Loss curves of a run: `metrics.jsonl` -> `loss.png`.

Uses matplotlib's object API with the Agg canvas directly, so plotting never needs a
display and never changes the global pyplot backend of the process that calls it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter

from mistral_train.tracking import METRICS_FILE, read_metrics

PLOT_FILE = "loss.png"


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def plot_run(run_dir: str | os.PathLike, out: Optional[str | os.PathLike] = None) -> Path:
    """Plot train loss (and eval loss when logged) against step, lr on a second axis.

    Args:
        run_dir: a run folder holding metrics.jsonl.
        out: where to write the PNG; default `run_dir/loss.png`.
    Returns:
        The path of the PNG written.
    """
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / METRICS_FILE)
    steps, loss = _series(rows, "loss")
    if not steps:
        raise ValueError(f"{run_dir / METRICS_FILE}: no row has a 'loss' to plot")
    figure = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.plot(steps, loss, label="train loss", color="tab:blue")
    eval_steps, eval_loss = _series(rows, "eval_loss")
    if eval_steps:
        ax.plot(eval_steps, eval_loss, "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    lr_steps, lr = _series(rows, "lr")
    if lr_steps:
        lr_ax = ax.twinx()
        lr_ax.plot(lr_steps, lr, "--", color="tab:gray", label="lr")
        lr_ax.set_ylabel("learning rate")
        lr_ax.yaxis.set_major_formatter(FormatStrFormatter("%.1e"))  # no offset text over the title
        more_handles, more_labels = lr_ax.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, loc="upper right")
    ax.set_title(run_dir.name)
    figure.tight_layout()
    path = Path(out) if out is not None else run_dir / PLOT_FILE
    figure.savefig(path)
    return path
