"""fit() with adapter=lora / qlora: only adapters train, checkpoints and final/ are PEFT adapters,
resume is exact, merge_at_end writes a full model equal to the adapter model, stages chain adapters."""

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mistral_train import Mistral
from mistral_train.config import AdapterSpec, DataSpec, ModelSpec, RunConfig, RunSpec, TrackingSpec, TrainerSpec
from mistral_train.data.sources import bundled_chat_path
from mistral_train.train import fit
from mistral_train.train.stages import stage_configs


@pytest.fixture
def base(tiny_base_folder):
    return tiny_base_folder


def _chat(folder, n=48):
    path = folder / "chat.jsonl"
    path.write_text("\n".join(bundled_chat_path().read_text().splitlines()[:n]) + "\n")
    return path


def _run(tmp_path, base, name, kind, **trainer) -> RunConfig:
    spec = dict(objective="sft", max_steps=20, max_seq_len=64, batch_size=4, lr=2e-2, warmup_steps=2, log_every=1,
                sample_max_new_tokens=2, weight_decay=0.0)
    spec.update(trainer)
    return RunConfig(model=ModelSpec(path=str(base)), data=DataSpec(path=str(_chat(tmp_path)), format="messages"),
                     trainer=TrainerSpec(**spec), adapter=AdapterSpec(kind=kind, r=8, alpha=16),
                     run=RunSpec(name=name, dir=str(tmp_path)), tracking=TrackingSpec(progress_bar=False, plot=False))


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_adapter_run_lowers_the_loss_and_writes_peft_adapters(tmp_path, base, kind):
    run_dir = fit(_run(tmp_path, base, kind, kind))
    losses = _losses(run_dir)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    final = run_dir / "final"
    assert {p.name for p in final.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "tokenizer.model"}
    assert not (final / "model.safetensors").exists()  # the frozen base is never copied
    checkpoint = run_dir / "checkpoints" / "step_20"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "training_state.pt").is_file()
    saved = load_file(final / "adapter_model.safetensors")
    assert saved and all(".lora_" in key for key in saved)
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    # the base did not move: the adapter's B matrices did
    assert any(float(t.abs().max()) > 0 for k, t in saved.items() if "lora_B" in k)


def test_adapter_resume_continues_exactly(tmp_path, base):
    full = fit(_run(tmp_path, base, "full", "lora", max_steps=6, save_every=3))
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_3", cut / "checkpoints" / "step_3")
    fit(dataclasses.replace(_run(tmp_path, base, "cut", "lora", max_steps=6, save_every=3), resume="latest"))
    a, b = load_file(full / "final" / "adapter_model.safetensors"), load_file(cut / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(cut) == _losses(full)[3:]


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_merge_at_end_writes_the_adapter_model_as_a_full_folder(tmp_path, base, kind, capsys):
    cfg = _run(tmp_path, base, f"merge_{kind}", kind, max_steps=3)
    cfg.adapter.merge_at_end = True
    run_dir = fit(cfg)
    merged = Mistral.from_pretrained(run_dir / "merged")
    assert "quantization_config" not in merged.config.extra and not any("absmax" in k for k in merged.state_dict())
    printed = capsys.readouterr().out
    difference = float(printed.split("max |logit difference| merged vs adapter")[1].split(": ")[1].split()[0])
    assert difference < 1e-4
    from mistral_train.adapters import load_adapter

    adapter_model = load_adapter(Mistral.from_pretrained(base, quantize="nf4" if kind == "qlora" else None,
                                                         dtype=torch.float32), run_dir / "final").eval()
    ids = torch.randint(0, 32000, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(ids), adapter_model(ids), atol=1e-4, rtol=1e-4)


def test_stages_continue_an_adapter_on_the_same_base(tmp_path, base):
    cfg = _run(tmp_path, base, "staged", "lora")
    cfg.stages = {"sft": {}, "more": {"trainer": {"max_steps": 2}}, "full": {"adapter": {"kind": "none"}}}
    with pytest.raises(Exception, match="merge_at_end"):
        stage_configs(cfg)
    cfg.stages = {"sft": {}, "more": {"adapter": {"merge_at_end": True}}, "full": {"adapter": {"kind": "none"}}}
    (_, sft), (_, more), (_, full) = stage_configs(cfg)
    assert sft.model.path == more.model.path == str(base) and sft.adapter.path is None
    assert more.adapter.path == str(tmp_path / "staged" / "sft" / "final")
    assert full.model.path == str(tmp_path / "staged" / "more" / "merged") and full.adapter.kind == "none"


def test_adapter_without_a_pretrained_base_is_refused(tmp_path, base):
    cfg = _run(tmp_path, base, "nobase", "lora")
    cfg.model = ModelSpec()
    with pytest.raises(ValueError, match="adapter=lora trains adapters on a pretrained base: set model.path"):
        fit(cfg)

