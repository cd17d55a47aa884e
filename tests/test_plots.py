"""loss.png from metrics.jsonl."""

import json

import pytest

from mistral_train.config import RunConfig, dump_run_config
from mistral_train.tracking.plots import draw_run, plot_run, run_objective, series
from mistral_train.train.objectives import loss_label

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRAIN = [{"step": s, "loss": 5.0 / s, "lr": 1e-3 * s} for s in range(1, 11)]
EVAL = [{"step": 5, "eval_loss": 1.2, "eval_ppl": 3.3, "exact_match": 0.1},
        {"step": 10, "loss": 0.5, "eval_loss": 0.7, "lr": 1e-2, "exact_match": 0.6}]


def _write(run_dir, rows):
    # json.dumps writes NaN as the bare token NaN, which json.loads reads back as a float nan
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _lines(figure) -> dict[str, tuple]:
    """label -> (xs, ys) of every labelled line in every axes of the figure."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
            for ax in figure.axes for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_plot_is_a_png_and_the_eval_curve_changes_it(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _write(tmp_path / "a", TRAIN)
    _write(tmp_path / "b", TRAIN + EVAL)
    without, with_eval = plot_run(tmp_path / "a"), plot_run(tmp_path / "b")
    assert without == tmp_path / "a" / "loss.png"
    for path in (without, with_eval):
        assert path.read_bytes().startswith(PNG_MAGIC)
    assert without.read_bytes() != with_eval.read_bytes()


def test_figure_has_eval_lr_and_exact_match_only_when_logged():
    plain = _lines(draw_run(TRAIN))
    assert set(plain) == {"train loss", "lr"}
    figure = draw_run(TRAIN + EVAL, title="run")
    lines = _lines(figure)
    assert set(lines) == {"train loss", "eval loss", "lr", "eval exact match"}
    assert lines["eval loss"] == ([5, 10], [1.2, 0.7])
    assert lines["eval exact match"] == ([5, 10], [0.1, 0.6])
    assert lines["train loss"][0] == list(range(1, 11))  # step 10's row is the last one for that step
    assert lines["train loss"][1][-1] == 0.5
    assert len(figure.axes) == 3  # loss, its lr twin, and the exact-match panel below


def test_missing_null_nan_and_text_values_are_skipped(tmp_path):
    rows = [{"step": 1, "loss": None, "lr": 1e-3}, {"step": 2, "loss": float("nan")}, {"step": 3, "loss": 2.0},
            {"step": 3, "eval_samples": "prompt: ...\nprediction: ..."}, {"loss": 9.0},
            {"step": 4, "loss": "oops", "eval_loss": float("inf")}, {"step": 5, "loss": 1.5, "exact_match": None}]
    assert series(rows, "loss") == ([3, 5], [2.0, 1.5])
    assert series(rows, "eval_loss") == ([], [])
    _write(tmp_path, rows)
    assert plot_run(tmp_path).read_bytes().startswith(PNG_MAGIC)
    assert set(_lines(draw_run(rows))) == {"train loss", "lr"}


def test_eval_only_runs_plot_and_empty_runs_fail(tmp_path):
    assert set(_lines(draw_run([{"step": 5, "eval_loss": 1.0}]))) == {"eval loss"}
    _write(tmp_path, [{"step": 1, "lr": 1e-3}])
    with pytest.raises(ValueError, match="metrics.jsonl: no row has a 'loss' or 'eval_loss'"):
        plot_run(tmp_path)


def _ylabel(figure) -> str:
    return figure.axes[0].get_ylabel()


@pytest.mark.parametrize("objective, loss_type, curve, axis", [
    ("pretrain", "sigmoid", "loss", "cross-entropy (nats/token)"),
    ("sft", "sigmoid", "loss", "cross-entropy (nats/token)"),
    ("dpo", "ipo", "DPO loss", "DPO loss (ipo), mean per pair"),
    ("dpo", ["sigmoid", "bco_pair"], "DPO loss", "DPO loss (sigmoid+bco_pair), mean per pair"),
    ("reward", "sigmoid", "reward loss", "reward-model loss -log sigmoid(r_chosen - r_rejected), mean per pair"),
])
def test_loss_is_labelled_as_the_runs_objective_defines_it(tmp_path, objective, loss_type, curve, axis):
    cfg = RunConfig()
    cfg.trainer.objective, cfg.trainer.dpo.loss_type = objective, loss_type
    dump_run_config(cfg, tmp_path / "config.yaml")  # what a run writes next to metrics.jsonl
    assert run_objective(tmp_path) == (objective, loss_type)
    assert loss_label(objective, loss_type) == (curve, axis)
    figure = draw_run(TRAIN + EVAL, loss=loss_label(*run_objective(tmp_path)))
    assert {f"train {curve}", f"eval {curve}"} <= set(_lines(figure)) and _ylabel(figure) == axis


def test_run_without_config_plots_as_a_language_model(tmp_path):
    assert run_objective(tmp_path) == ("pretrain", "sigmoid")
    assert _ylabel(draw_run(TRAIN)) == "cross-entropy (nats/token)"


def test_plot_run_of_a_dpo_run_differs_from_the_same_rows_as_sft(tmp_path):
    pngs = {}
    for objective in ("sft", "dpo"):
        run = tmp_path / objective
        run.mkdir()
        _write(run, TRAIN)
        cfg = RunConfig()
        cfg.trainer.objective = objective
        dump_run_config(cfg, run / "config.yaml")
        pngs[objective] = plot_run(run, loss=loss_label(*run_objective(run))).read_bytes()
    assert pngs["sft"] != pngs["dpo"]  # same curve, other labels: the file read config.yaml
