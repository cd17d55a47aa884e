"""KTO runs through fit() (trainer.objective=kto): it trains and writes final/, resumes exactly, takes its
reference as DPO does (a frozen copy, or the adapters switched off), and refuses data and settings it
cannot use with one line naming them. Step parity with trl: tests/oracle/test_kto_trainer_parity.py."""

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mistral_train.config import (AdapterSpec, DataSpec, KTOSpec, ModelSpec, RunConfig, RunSpec, TrackingSpec,
                                  TrainerSpec)
from mistral_train.data.sources import bundled_unpaired_path
from mistral_train.errors import ConfigError, DataError
from mistral_train.train import fit

KTO_METRICS = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def _rows_file(folder, n=24):
    path = folder / "kto.jsonl"
    path.write_text("\n".join(bundled_unpaired_path().read_text().splitlines()[:n]) + "\n")
    return path


def _run(tmp_path, base, name, *, adapter="none", packing=True, steps=4, **kto) -> RunConfig:
    trainer = TrainerSpec(objective="kto", max_steps=steps, max_seq_len=64, batch_size=4, lr=3e-3, warmup_steps=1,
                          weight_decay=0.0, log_every=1, eval_max_new_tokens=0, sample_max_new_tokens=1,
                          kto=KTOSpec(**kto))
    return RunConfig(model=ModelSpec(path=str(base)),
                     data=DataSpec(path=str(_rows_file(tmp_path)), format="unpaired", packing=packing),
                     trainer=trainer, adapter=AdapterSpec(kind=adapter, r=4, alpha=8),
                     run=RunSpec(name=name, dir=str(tmp_path)), tracking=TrackingSpec(progress_bar=False, plot=False))


def _logged(run_dir):
    rows = (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if "loss" in r]


def test_kto_trains_logs_trls_metrics_and_writes_final(tmp_path, tiny_base_folder):
    """8 steps (beta 0.5) over 24 rows, scored before and after on the same rows (the per-batch loss is noisy:
    4 examples): the KTO loss falls from 0.5 (policy == reference) and desirable answers move above the rest."""
    cfg = _run(tmp_path, tiny_base_folder, "kto", steps=8, beta=0.5)
    cfg.trainer = dataclasses.replace(cfg.trainer, eval_before_training=True)
    cfg.data = dataclasses.replace(cfg.data, eval_path=cfg.data.path)
    run_dir = fit(cfg)
    rows = _logged(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6) and rows[0]["kl"] == 0.0  # policy == reference at step 1
    assert all(r["grad_norm"] > 0 for r in rows) and len({r["loss"] for r in rows}) > 1
    scored = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    before, after = (r for r in scored if "eval_loss" in r)
    assert before["eval_loss"] == pytest.approx(0.5, abs=1e-6) and before["eval_rewards/margins"] == 0.0
    assert after["eval_loss"] < 0.45 and after["eval_rewards/margins"] > 0.3  # measured 0.371 and 1.17
    for key in KTO_METRICS:
        assert key in rows[0] and f"eval_{key}" in after
    final = run_dir / "final"
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    start, end = load_file(tiny_base_folder / "model.safetensors"), load_file(final / "model.safetensors")
    assert any(not torch.equal(start[k], end[k]) for k in start)


def test_packed_and_padded_examples_give_the_same_losses(tmp_path, tiny_base_folder):
    packed = _logged(fit(_run(tmp_path, tiny_base_folder, "packed", packing=True)))
    padded = _logged(fit(_run(tmp_path, tiny_base_folder, "padded", packing=False)))
    for key in ("loss", "kl", "rewards/margins"):
        assert [r[key] for r in packed] == pytest.approx([r[key] for r in padded], abs=1e-5), key


def test_kto_resumes_exactly(tmp_path, tiny_base_folder):
    """A run cut after its step-2 checkpoint and resumed ends with the weights of the uncut run, logging steps 3-6
    identically: data position (mid-epoch, the mismatched pairs rebuilt per batch), optimizer and RNG restored."""
    def run(name, **changes):
        cfg = _run(tmp_path, tiny_base_folder, name, steps=6)
        cfg.trainer = dataclasses.replace(cfg.trainer, save_every=2, keep_last=5)
        return dataclasses.replace(cfg, **changes)

    full = fit(run("full"))
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_2", cut / "checkpoints" / "step_2")
    fit(run("cut", resume="latest"))
    a, b = load_file(full / "final" / "model.safetensors"), load_file(cut / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _logged(cut)] == [r["loss"] for r in _logged(full)][2:]
    assert [r["kl"] for r in _logged(cut)] == [r["kl"] for r in _logged(full)][2:]


def test_lora_kto_takes_the_adapter_off_model_as_reference(tmp_path, tiny_base_folder):
    """With adapter=lora, reference auto is the adapters switched off: step 1 is policy == reference (B = 0)."""
    rows = _logged(fit(_run(tmp_path, tiny_base_folder, "lora", adapter="lora", steps=3)))
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6) and rows[-1]["loss"] != rows[0]["loss"]
    assert (tmp_path / "lora" / "final" / "adapter_model.safetensors").is_file()


def test_kto_refuses_chat_rows_with_the_data_kind_message(tmp_path, tiny_base_folder):
    cfg = _run(tmp_path, tiny_base_folder, "chat")
    cfg.data = DataSpec(format="messages")  # the bundled chat rows
    with pytest.raises(ValueError, match="holds chat rows, but trainer.objective=kto trains on unpaired preferences; "
                                         "give it unpaired preferences: prompt/completion/label rows"):
        fit(cfg)


def test_an_sft_run_on_unpaired_rows_points_to_kto(tmp_path, tiny_base_folder):
    cfg = _run(tmp_path, tiny_base_folder, "sft_on_unpaired")
    cfg.trainer = dataclasses.replace(cfg.trainer, objective="sft")
    with pytest.raises(ValueError, match="holds unpaired preferences, but trainer.objective=sft trains on chat rows.*"
                                         "trainer.objective=kto"):
        fit(cfg)


@pytest.mark.parametrize("changes, error, message", [
    (dict(batch_size=1), ConfigError, r"trainer.batch_size=1 with trainer.kto.loss_type=kto: .* at least 2 examples"),
    (dict(kto=KTOSpec(loss_type="sigmoid")), ConfigError, "trainer.kto.loss_type='sigmoid': expected one of kto, "
                                                          "apo_zero_unpaired"),
    (dict(kto=KTOSpec(reference="none")), ValueError, "trainer.kto.reference=none only suits reference-free losses"),
    (dict(kto=KTOSpec(reference="adapter_off")), ValueError, "trainer.kto.reference=adapter_off needs adapter=lora"),
    (dict(kto=KTOSpec(desirable_weight=0.0)), ConfigError, r"trainer.kto.desirable_weight=0.0: expected a positive"),
])
def test_bad_kto_settings_are_one_line_naming_the_key(tmp_path, tiny_base_folder, changes, error, message):
    cfg = _run(tmp_path, tiny_base_folder, "bad")
    cfg.trainer = dataclasses.replace(cfg.trainer, **changes)
    with pytest.raises(error, match=message) as info:
        fit(cfg)
    assert "\n" not in str(info.value)


def test_a_bad_row_stops_the_run_naming_file_and_line(tmp_path, tiny_base_folder):
    cfg = _run(tmp_path, tiny_base_folder, "bad_row")
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "q", "completion": "a", "label": True}) + "\n"
                    + json.dumps({"prompt": "q", "completion": "a", "label": "yes"}) + "\n")
    cfg.data = DataSpec(path=str(path), format="unpaired")
    with pytest.raises(DataError, match=f"{path} line 2: field 'label' must be a bool, got str"):
        fit(cfg)
