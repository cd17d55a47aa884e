"""metrics.jsonl logging and the optional trackers."""

import json

import torch

from mistral_train.config import TrackingSpec
from mistral_train.tracking import MetricsLogger, read_metrics


def test_metrics_are_one_valid_json_object_per_line(tmp_path):
    logger = MetricsLogger(tmp_path, TrackingSpec())
    logger.log(1, {"loss": torch.tensor(2.5), "lr": 1e-3})
    # flushed per line: readable before close
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0]) == {"step": 1, "loss": 2.5, "lr": 1e-3}
    logger.log(2, {"loss": float("nan"), "grad_norm": torch.tensor(0.5, dtype=torch.bfloat16)})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # strict JSON: NaN would not parse in other readers
    assert "NaN" not in lines[1]
    assert rows[1] == {"step": 2, "loss": None, "grad_norm": 0.5}
    assert read_metrics(tmp_path) == rows


def test_resume_drops_rows_after_the_checkpoint(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step in (1, 5, 10, 15):
            logger.log(step, {"loss": float(step)})
    with MetricsLogger(tmp_path, resume_step=10) as logger:
        logger.log(15, {"loss": 0.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (5, 5.0), (10, 10.0), (15, 0.0)]


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "run", enabled=False)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "run").exists()


def test_tensorboard_and_offline_wandb(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    spec = TrackingSpec(wandb=True, tensorboard=True)
    with MetricsLogger(tmp_path, spec, config={"trainer": {"lr": 1e-3}}) as logger:
        logger.log(1, {"loss": 3.0})
        logger.log(2, {"loss": 2.0})
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 3.0), (2, 2.0)]
    offline = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline) == 1  # offline by default: no network, no API key
    records = list(offline[0].glob("run-*.wandb"))
    assert len(records) == 1 and b"loss" in records[0].read_bytes()
