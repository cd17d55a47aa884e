"""metrics.jsonl logging and the optional trackers."""

import json
import sys
import time

import pytest
import torch

from mistral_train.config import TrackingSpec, load_run_config
from mistral_train.tracking.trackers import tracker_names
from mistral_train.tracking.metrics import Meter, MetricsLogger, read_metrics

SAMPLES = [{"prompt": "<s>[INST] Which colour is the ball? [/INST]", "answer": "brown", "prediction": "Brown.",
            "correct": True},
           {"prompt": "<s>[INST] Two plus two? [/INST]", "answer": "four", "prediction": "five", "correct": False}]


def test_metrics_are_one_valid_json_object_per_line(tmp_path):
    logger = MetricsLogger(tmp_path, TrackingSpec())
    logger.log(1, {"loss": torch.tensor(2.5), "lr": 1e-3})
    # flushed per line: readable before close
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0]) == {"step": 1, "loss": 2.5, "lr": 1e-3}
    logger.log(2, {"loss": float("nan"), "grad_norm": torch.tensor(0.5, dtype=torch.bfloat16), "sample": "a\nb"})
    logger.log_samples(2, SAMPLES)
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # strict JSON: NaN would not parse in other readers
    assert "NaN" not in lines[1]
    assert rows[1] == {"step": 2, "loss": None, "grad_norm": 0.5, "sample": "a\nb"}
    assert rows[2]["step"] == 2 and isinstance(rows[2]["eval_samples"], str)
    for sample in SAMPLES:
        assert f"prompt: {sample['prompt']}\nanswer: {sample['answer']}\nprediction: {sample['prediction']}" in rows[2]["eval_samples"]
    assert read_metrics(tmp_path) == rows


def test_read_metrics_drops_a_torn_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # killed mid-write
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}]
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: invalid JSON"):
        read_metrics(path)


def test_resume_drops_rows_after_the_checkpoint(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step in (1, 5, 10, 15):
            logger.log(step, {"loss": float(step)})
    with MetricsLogger(tmp_path, resume_step=10) as logger:
        logger.log(15, {"loss": 0.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (5, 5.0), (10, 10.0), (15, 0.0)]


def test_meter_rows_average_since_the_last_row_and_keep_the_first_and_last_loss():
    padded = {"input_ids": torch.zeros(2, 4), "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}
    packed = {"input_ids": torch.zeros(1, 8), "pad_mask": torch.tensor([[False] * 6 + [True] * 2])}
    meter = Meter()
    assert meter.add([padded, packed], seconds=2.0, loss=3.0) == 16 / 2.0  # tokens drawn / seconds
    meter.add([{"input_ids": torch.zeros(1, 4)}], seconds=2.0, loss=2.0)  # no padding key: no share
    # (8 + 8 + 4) tokens over 4 s; padding shares 3/8 and 2/8, averaged per batch
    assert meter.row(epoch=0.5) == {"tokens_per_s": 5.0, "epoch": 0.5, "padding_share": (3 / 8 + 2 / 8) / 2}
    meter.add([packed], seconds=1.0, loss=1.0)
    assert meter.row(epoch=1.0) == {"tokens_per_s": 8.0, "epoch": 1.0, "padding_share": 2 / 8}  # restarted
    assert (meter.first_loss, meter.last_loss) == (3.0, 1.0)


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "run", TrackingSpec(tensorboard=True), enabled=False)
    logger.log(1, {"loss": 1.0})
    logger.log_samples(1, SAMPLES)
    logger.close()
    assert not (tmp_path / "run").exists()


def test_tracker_names_merge_the_switches_and_reject_unknown_names(tmp_path):
    assert tracker_names(TrackingSpec()) == []
    spec = TrackingSpec(trackers=["TensorBoard", "mlflow"], tensorboard=True, wandb=True)
    assert tracker_names(spec) == ["tensorboard", "mlflow", "wandb"]
    for enabled in (True, False):  # a misspelt name fails on every process
        with pytest.raises(ValueError, match=r"unknown tracker 'mlfow'; expected any of .*mlflow.*tensorboard.*wandb"):
            MetricsLogger(tmp_path / "run", TrackingSpec(trackers=["mlfow"]), enabled=enabled)
    assert not (tmp_path / "run").exists()


def test_a_missing_tracker_package_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # makes `import mlflow` raise ImportError
    with pytest.raises(ImportError, match=r"'mlflow', which needs the `mlflow` package.*pip install mlflow"):
        MetricsLogger(tmp_path, TrackingSpec(trackers=["mlflow"]))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_trackers_list_composes_from_the_command_line():
    cfg = load_run_config(overrides=["tracking.trackers=[tensorboard,mlflow]"])
    assert cfg.tracking.trackers == ["tensorboard", "mlflow"]


def test_tensorboard_scalars_and_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, TrackingSpec(trackers=["tensorboard"]), config={"trainer": {"lr": 1e-3}}) as logger:
        logger.log(1, {"loss": 3.0})
        logger.log(2, {"loss": 2.0, "eval_loss": 2.5, "note": "plain text"})
        logger.log_samples(2, SAMPLES)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 3.0), (2, 2.0)]
    assert [(e.step, e.value) for e in acc.Scalars("eval_loss")] == [(2, 2.5)]
    assert "note" not in acc.Tags()["scalars"]
    (text,) = acc.Tensors("eval_samples/text_summary")
    assert text.step == 2
    body = text.tensor_proto.string_val[0].decode()
    assert "prediction: Brown." in body and "answer: four" in body
    assert "plain text" in acc.Tensors("note/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"lr": 0.001' in acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()


def test_offline_wandb_with_samples_table_and_resume(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    spec = TrackingSpec(wandb=True)
    with MetricsLogger(tmp_path, spec, config={"trainer": {"lr": 1e-3}}) as logger:
        logger.log(1, {"loss": 3.0})
        logger.log(2, {"loss": 2.0})
        logger.log_samples(2, SAMPLES)
    offline = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline) == 1  # offline by default: no network, no API key
    (record,) = offline[0].glob("run-*.wandb")
    # wandb's service process writes the record file; under load it may still be flushing after finish()
    deadline = time.monotonic() + 30
    while not all(key in record.read_bytes() for key in (b"loss", b"eval_samples", b"table-file")):
        assert time.monotonic() < deadline, f"{record} lacks the logged keys: {record.read_bytes()[:200]!r}"
        time.sleep(0.2)
    run_id = (tmp_path / "wandb" / "run_id").read_text().strip()
    assert offline[0].name.endswith(run_id)
    with MetricsLogger(tmp_path, spec, resume_step=2) as logger:  # a resumed run continues the same wandb run
        logger.log(3, {"loss": 1.0})
    resumed = set((tmp_path / "wandb").glob("offline-run-*")) - set(offline)
    assert len(resumed) == 1 and resumed.pop().name.endswith(run_id)


def test_other_accelerate_trackers_go_through_accelerates_class(tmp_path, monkeypatch):
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker

    calls = []

    class Recorder(GeneralTracker):  # stands in for aim, comet_ml, ... (not installed here)
        name, requires_logging_directory, tracker = "recorder", True, None

        def __init__(self, run_name, logging_dir):
            super().__init__()
            calls.append(("init", run_name, logging_dir))

        def start(self):
            calls.append(("start",))

        def store_init_configuration(self, values):
            calls.append(("config", values))

        def log(self, values, step=None):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    monkeypatch.setitem(LOGGER_TYPE_TO_CLASS, "recorder", Recorder)
    config = {"trainer": {"lr": 1e-3}, "data": {"path": None, "weights": [1, 2]}}
    with MetricsLogger(tmp_path, TrackingSpec(trackers=["recorder"]), config=config) as logger:
        logger.log(3, {"loss": 2.0, "note": "text"})
        logger.log_samples(3, SAMPLES[:1])
    assert calls[:3] == [("init", "mistral-train", str(tmp_path / "recorder")), ("start",),
                         ("config", {"trainer.lr": 1e-3, "data.path": "null", "data.weights": "[1, 2]"})]
    assert calls[3:5] == [("log", {"loss": 2.0}, 3), ("log", {"note": "text"}, 3)]
    assert calls[5][0] == "log" and "prediction: Brown." in calls[5][1]["eval_samples"]
    assert calls[6:] == [("finish",)]
