"""loss.png from metrics.jsonl."""

import json

import pytest

from mistral_train.plots import plot_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(run_dir, rows):
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_is_a_png(tmp_path):
    _write(tmp_path, [{"step": s, "loss": 5.0 / s, "lr": 1e-3 * s} for s in range(1, 11)]
           + [{"step": 10, "loss": 0.5, "eval_loss": 0.7, "lr": 1e-2}])
    path = plot_run(tmp_path)
    assert path == tmp_path / "loss.png"
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_plot_needs_a_loss(tmp_path):
    _write(tmp_path, [{"step": 1, "lr": 1e-3}])
    with pytest.raises(ValueError, match="metrics.jsonl: no row has a 'loss'"):
        plot_run(tmp_path)
