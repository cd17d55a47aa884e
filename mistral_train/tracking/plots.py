"""Curves of a run: `metrics.jsonl` -> `loss.png`.

Top panel: train loss and eval loss against step, learning rate on a second axis, the loss named as
the run's objective defines it (the caller's label, read from its config.yaml by `run_objective`:
cross-entropy, or a DPO / reward-model loss per pair).
A second panel shows held-out exact match when the run logged one; a model with experts gets an expert-load
panel (tokens routed to each expert per step, averaged over its MoE layers, against the balanced share).
Missing keys, nulls, NaN and non-numeric values (text samples) are skipped; a step logged twice keeps its last
value.
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
from mistral_train.tracking.metrics import EXPERT_LOAD_PREFIX, METRICS_FILE, read_metrics

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


def expert_load(rows: list[dict[str, Any]]) -> tuple[list[int], dict[int, list[float]]]:
    """(steps, {expert: tokens per step averaged over the MoE layers}) from the `expert_tokens/L/E` metrics
    (tracking/metrics.py expert_load_metrics); empty for a model without experts."""
    keys = sorted({k for row in rows for k in row if k.startswith(EXPERT_LOAD_PREFIX + "/")})
    by_expert: dict[int, list[str]] = {}
    for key in keys:
        by_expert.setdefault(int(key.rsplit("/", 1)[1]), []).append(key)
    steps = series(rows, keys[0])[0] if keys else []
    curves = {}
    for expert, layer_keys in sorted(by_expert.items()):
        per_layer = [dict(zip(*series(rows, key))) for key in layer_keys]
        curves[expert] = [sum(layer.get(step, 0.0) for layer in per_layer) / len(per_layer) for step in steps]
    return steps, curves


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
    load_steps, load = expert_load(rows)
    ratios = [2] + [1] * (bool(match_steps) + bool(load_steps))
    figure = Figure(figsize=(7, 4.5 + 2 * (len(ratios) - 1)), dpi=100)
    FigureCanvasAgg(figure)
    axes = ([figure.add_subplot()] if len(ratios) == 1
            else list(figure.subplots(len(ratios), 1, sharex=True, height_ratios=ratios)))
    ax = axes.pop(0)
    match_ax = axes.pop(0) if match_steps else None
    load_ax = axes.pop(0) if load_steps else None
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
    if load_ax is not None:
        _draw_expert_load(load_ax, load_steps, load)
    (load_ax or match_ax or ax).set_xlabel("step")
    figure.tight_layout()
    return figure


def _draw_expert_load(ax, steps: list[int], load: dict[int, list[float]]) -> None:
    """One line per expert; dashed: the balanced share (every expert the mean), so an idle or hogging expert shows."""
    for expert, counts in load.items():
        ax.plot(steps, counts, label=f"expert {expert}", linewidth=1)
    balanced = [sum(values) / len(load) for values in zip(*load.values())]
    ax.plot(steps, balanced, "k--", linewidth=1, label="balanced")
    ax.set_ylabel("tokens per expert\n(mean over layers)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="x-small", ncol=min(len(load) + 1, 5))


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
