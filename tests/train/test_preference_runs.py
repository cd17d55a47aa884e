"""DPO and reward runs through fit(): every kind of reference, the reference cache, packed == padded,
the SFT adapter as reference, and bad pair data stopping the run with its row named."""

import dataclasses
import json

import pytest
import torch

from mistral_train import Mistral
from mistral_train.adapters import load_adapter, peft_state_dict
from mistral_train.config import AdapterSpec, DataSpec, DPOSpec, ModelSpec, RunConfig, RunSpec, TrackingSpec, TrainerSpec
from mistral_train.data.audit import AuditError
from mistral_train.train.run_data import read_data
from mistral_train.data.sources import bundled_pairs_path
from mistral_train.tokenizer.tokenizer import load_tokenizer
from mistral_train.train import fit
from mistral_train.train import reference_cache
from mistral_train.train.reference import build_reference, resolve_reference
from mistral_train.train.steps import sequence_logprobs


def _pairs(folder, n=24):
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(bundled_pairs_path().read_text().splitlines()[:n]) + "\n")
    return path


def _run(tmp_path, base, name, *, adapter="none", adapter_path=None, packing=True, **dpo) -> RunConfig:
    trainer = TrainerSpec(objective="dpo", max_steps=4, max_seq_len=64, batch_size=4, lr=1e-3, warmup_steps=1,
                          weight_decay=0.0, log_every=1, eval_max_new_tokens=0, sample_max_new_tokens=1,
                          dpo=DPOSpec(**dpo))
    return RunConfig(model=ModelSpec(path=str(base)), data=DataSpec(path=str(_pairs(tmp_path)), format="preference",
                                                                    packing=packing),
                     trainer=trainer, adapter=AdapterSpec(kind=adapter, path=adapter_path, r=4, alpha=8),
                     run=RunSpec(name=name, dir=str(tmp_path)), tracking=TrackingSpec(progress_bar=False, plot=False))


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir):
    return [r["loss"] for r in _rows(run_dir) if "loss" in r]


def test_dpo_learns_the_pairs_and_logs_trls_metrics(tmp_path, tiny_base_folder):
    cfg = _run(tmp_path, tiny_base_folder, "dpo", beta=0.5)
    cfg.trainer = dataclasses.replace(cfg.trainer, max_steps=12, lr=3e-3)
    rows = _rows(fit(cfg))
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    assert rows[-1]["loss"] < 0.6 and rows[-1]["rewards/accuracies"] > 0.7 and rows[-1]["rewards/margins"] > 0
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert key in rows[-1]


def test_packed_and_padded_pairs_give_the_same_losses(tmp_path, tiny_base_folder):
    packed = _losses(fit(_run(tmp_path, tiny_base_folder, "packed", packing=True)))
    padded = _losses(fit(_run(tmp_path, tiny_base_folder, "padded", packing=False)))
    assert packed == pytest.approx(padded, abs=1e-5)


@pytest.mark.parametrize("adapter", ["none", "lora"])
def test_precomputed_reference_equals_on_the_fly_and_the_cache_is_reused(tmp_path, tiny_base_folder, adapter,
                                                                          monkeypatch, capsys):
    live = _losses(fit(_run(tmp_path, tiny_base_folder, "live", adapter=adapter)))
    calls = []
    compute = reference_cache.compute_table
    monkeypatch.setattr(reference_cache, "compute_table", lambda *a, **k: calls.append(1) or compute(*a, **k))
    first = _losses(fit(_run(tmp_path, tiny_base_folder, "cached1", adapter=adapter, precompute_reference=True)))
    assert calls == [1] and "computed and cached in" in capsys.readouterr().out
    second = _losses(fit(_run(tmp_path, tiny_base_folder, "cached2", adapter=adapter, precompute_reference=True)))
    assert calls == [1] and "read from" in capsys.readouterr().out  # the second run computed nothing
    assert first == pytest.approx(live, abs=1e-5) and second == first
    files = list((tmp_path / "reference_cache").glob("*.safetensors"))
    assert len(files) == 1
    # another reference (the data or the model changes) is another file
    fit(_run(tmp_path, tiny_base_folder, "cached3", adapter=adapter, precompute_reference=True, beta=0.2,
             packing=False))
    assert len(list((tmp_path / "reference_cache").glob("*.safetensors"))) == 2


def test_continuing_an_sft_adapter_the_reference_is_the_sft_model_not_the_base(tmp_path, tiny_base_folder):
    sft_cfg = RunConfig(model=ModelSpec(path=str(tiny_base_folder)), data=DataSpec(format="messages"),
                        trainer=TrainerSpec(objective="sft", max_steps=6, max_seq_len=64, batch_size=8, lr=2e-2,
                                            eval_max_new_tokens=0, sample_max_new_tokens=1),
                        adapter=AdapterSpec(kind="lora", r=4, alpha=8), run=RunSpec(name="sft", dir=str(tmp_path)),
                        tracking=TrackingSpec(progress_bar=False, plot=False))
    sft_adapter = fit(sft_cfg) / "final"
    cfg = _run(tmp_path, tiny_base_folder, "dpo", adapter="lora", adapter_path=str(sft_adapter))
    assert resolve_reference(cfg.trainer.dpo, cfg.adapter) == "initial_adapter"
    tokenizer = load_tokenizer(tiny_base_folder)
    batch = next(iter(read_data(cfg, tokenizer).train))

    policy = load_adapter(Mistral.from_pretrained(tiny_base_folder), sft_adapter)
    reference = build_reference("initial_adapter", policy, 64)
    with torch.no_grad():  # the policy moves away from where it started...
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    sft_model = load_adapter(Mistral.from_pretrained(tiny_base_folder), sft_adapter).eval()
    base = Mistral.from_pretrained(tiny_base_folder).eval()
    moved_weights = peft_state_dict(policy)
    with torch.no_grad():
        ref = reference(policy, batch)
        expected, _ = sequence_logprobs(sft_model, batch, 64)
        bare, _ = sequence_logprobs(base, batch, 64)
        moved, _ = sequence_logprobs(policy.eval(), batch, 64)
    torch.testing.assert_close(ref, expected, atol=1e-5, rtol=1e-5)  # ...the reference stays the SFT model
    assert (ref - bare).abs().max() > 1e-3 and (ref - moved).abs().max() > 1e-3
    after = peft_state_dict(policy)  # and the policy got its own weights back after the reference pass
    assert after.keys() == moved_weights.keys() and all(torch.equal(after[k], moved_weights[k]) for k in after)
    adapter_off = build_reference("adapter_off", policy, 64)
    with torch.no_grad():
        torch.testing.assert_close(adapter_off(policy, batch), bare, atol=1e-5, rtol=1e-5)


def test_reference_kinds_are_checked_against_the_run():
    lora, none = AdapterSpec(kind="lora"), AdapterSpec()
    assert resolve_reference(DPOSpec(), none) == "copy" and resolve_reference(DPOSpec(), lora) == "adapter_off"
    assert resolve_reference(DPOSpec(loss_type="simpo"), lora) == "none"
    with pytest.raises(ValueError, match="adapter_off needs adapter=lora or qlora"):
        resolve_reference(DPOSpec(reference="adapter_off"), none)
    with pytest.raises(ValueError, match="initial_adapter needs adapter.path"):
        resolve_reference(DPOSpec(reference="initial_adapter"), lora)
    with pytest.raises(ValueError, match="reference=none only suits reference-free losses"):
        resolve_reference(DPOSpec(reference="none"), none)
    with pytest.raises(ValueError, match="trainer.dpo.reference must be one of"):
        resolve_reference(DPOSpec(reference="frozen"), none)


BAD = [
    ({"prompt": "Q?", "chosen": "a"}, "line 2: .*'rejected'"),
    ({"chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "Other?"}, {"role": "assistant", "content": "b"}]},
     "line 2: the prompt differs between 'chosen' and 'rejected'"),
]


@pytest.mark.parametrize("row, message", BAD)
def test_bad_pairs_stop_the_run_naming_file_and_line(tmp_path, tiny_base_folder, row, message):
    cfg = _run(tmp_path, tiny_base_folder, "bad")
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "Q?", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(row) + "\n")
    cfg.data.path = str(path)
    with pytest.raises(ValueError, match=message) as info:
        fit(cfg)
    assert str(path) in str(info.value)


def test_identical_pairs_warn_by_default_and_stop_the_run_when_asked(tmp_path, tiny_base_folder):
    lines = _pairs(tmp_path).read_text().splitlines()
    same = json.loads(lines[3])
    same["rejected"] = same["chosen"]
    path = tmp_path / "same.jsonl"
    path.write_text("\n".join(lines[:3] + [json.dumps(same)] + lines[4:]) + "\n")
    cfg = _run(tmp_path, tiny_base_folder, "same")
    cfg.data.path = str(path)
    data = read_data(cfg, load_tokenizer(tiny_base_folder))
    assert data.report.identical == [(str(path), 4)] and any("1 identical pair (" in n for n in data.report.notes)
    cfg.data.identical_pairs = "error"
    with pytest.raises(AuditError, match=f"{path} row 4: chosen and rejected are identical"):
        fit(cfg)


def test_reward_model_learns_to_prefer_the_true_answer(tmp_path, tiny_base_folder):
    cfg = _run(tmp_path, tiny_base_folder, "reward", packing=False)
    cfg.trainer = dataclasses.replace(cfg.trainer, objective="reward", max_steps=15, lr=3e-3)
    cfg.data.eval_path = str(bundled_pairs_path("eval"))
    run_dir = fit(cfg)
    rows = [r for r in _rows(run_dir) if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1 and rows[-1]["accuracy"] > 0.6 and "eval_accuracy" in rows[-1]
    config = json.loads((run_dir / "final" / "config.json").read_text())
    assert config["architectures"] == ["MistralForSequenceClassification"] and config["pad_token_id"] == 2
    model = Mistral.from_pretrained(run_dir / "final", task="sequence_classification")
    assert model.score.weight.shape == (1, 64)
    cfg.data.packing = True
    with pytest.raises(ValueError, match="set data.packing=false"):
        fit(dataclasses.replace(cfg, run=RunSpec(name="packed_reward", dir=str(tmp_path))))


def test_dpo_on_chat_rows_is_refused_naming_the_format(tmp_path, tiny_base_folder):
    cfg = _run(tmp_path, tiny_base_folder, "chat")
    cfg.data = DataSpec(format="messages")
    with pytest.raises(ValueError, match="holds chat rows, but trainer.objective=dpo trains on preference pairs.*data.format=preference"):
        fit(cfg)


def test_a_lora_reward_model_trains_its_head_and_merges_into_a_classification_folder(tmp_path, tiny_base_folder, capsys):
    from mistral_train.train.export import merge_adapter_folder

    cfg = _run(tmp_path, tiny_base_folder, "lora_reward", adapter="lora", packing=False)
    cfg.trainer = dataclasses.replace(cfg.trainer, objective="reward", max_steps=3)
    run_dir = fit(cfg)
    adapter_config = json.loads((run_dir / "final" / "adapter_config.json").read_text())
    assert adapter_config["modules_to_save"] == ["score"] and adapter_config["task_type"] == "SEQ_CLS"
    difference = merge_adapter_folder(run_dir / "final", tmp_path / "merged")
    assert difference < 1e-4
    merged = Mistral.from_pretrained(tmp_path / "merged", task="sequence_classification")
    assert merged.score.weight.shape == (1, 64) and merged.config.pad_token_id == 2
