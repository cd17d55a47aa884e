"""Everything else works on every class of the dense Mistral family (issue 15 item 5).

Each case is a tiny transformers folder of one class, saved by transformers itself in a temp dir with the real
v1 tokenizer beside it, then used as a user would: LoRA SFT (targets by name) on packed rows with a checkpoint,
an exact resume from it, `mistral-train merge` (transformers loads the merged folder with the adapter model's
logits), our adapter in peft on the transformers model and peft's in ours (equal logits), QLoRA SFT (every
adapter gets a gradient), one DPO step, greedy generation equal to transformers', and `plan` counting the
folder's parameters as transformers does. The architecture parity itself (logits and gradients of each class)
is tests/oracle/test_dense_family_parity.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from mistral_train import Mistral
from mistral_train.adapters import load_adapter
from mistral_train.cli import main
from mistral_train.config import AdapterSpec, DataSpec, DPOSpec, ModelSpec, RunConfig, RunSpec, TrackingSpec, TrainerSpec
from mistral_train.data.sources import bundled_chat_path, bundled_pairs_path
from mistral_train.generate import generate
from mistral_train.plan import plan_run
from mistral_train.train import fit
from tests._tokenizers import bundled, with_tokenizer_model
from tests.conftest import max_abs, tiny_kwargs

LOGIT_TOL = 1e-4
TARGETS = ["q_proj", "v_proj", "down_proj"]  # by name: one attention input, its value path, and the MLP's output
# v1's 32000 rows; attention 4 x 32 = 128 wide over a 64-wide residual (head_dim != hidden / heads, as in Nemo),
# every in_features a multiple of 64 (bitsandbytes' CPU NF4 block); init 0.1 so a few adapter steps move the loss
TEXT = tiny_kwargs(vocab_size=32000, hidden_size=64, intermediate_size=128, head_dim=32, initializer_range=0.1)


def _mistral() -> transformers.PreTrainedModel:
    """MistralForCausalLM with Nemo's trait: attention wider than the residual stream."""
    return transformers.MistralForCausalLM(transformers.MistralConfig(**TEXT))


def _ministral() -> transformers.PreTrainedModel:
    """MinistralForCausalLM (Ministral-8B-2410's class): a sliding layer (window 8) then a full one."""
    config = transformers.MinistralConfig(**{**TEXT, "sliding_window": 8},
                                          layer_types=["sliding_attention", "full_attention"])
    return transformers.MinistralForCausalLM(config)


def _ministral3(tied: bool = False) -> transformers.PreTrainedModel:
    """Ministral3ForCausalLM (Ministral 3's text model): YaRN over an original context of 16 tokens and the llama-4
    query scaling, so the 32-token rows and 22-token generations run past it; tied like the 3B when `tied`."""
    rope = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16, beta_fast=32.0,
                beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1)
    text = {k: v for k, v in TEXT.items() if k != "rope_theta"} | {"tie_word_embeddings": tied}
    return transformers.Ministral3ForCausalLM(transformers.Ministral3Config(**text, rope_parameters=rope))


def _mistral3() -> transformers.PreTrainedModel:
    """Mistral3ForConditionalGeneration (Mistral-Small 3.1/3.2's class): the Nemo-like mistral text model beside a
    one-layer Pixtral tower and the projector, which a run carries untouched; the head untied, as published."""
    vision = transformers.PixtralVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                              num_attention_heads=2, head_dim=32, patch_size=4, image_size=16)
    config = transformers.Mistral3Config(text_config=transformers.MistralConfig(**TEXT), vision_config=vision,
                                         tie_word_embeddings=False)
    return transformers.Mistral3ForConditionalGeneration(config)


# case -> the transformers model it saves (seeded before the call)
CASES: dict[str, Callable[[], transformers.PreTrainedModel]] = {
    "mistral_nemo_head_dim": _mistral,
    "ministral_layer_types": _ministral,
    "ministral3_yarn": _ministral3,
    "ministral3_tied": lambda: _ministral3(tied=True),
    "mistral3_vision_language": _mistral3,
}
# the language model's TARGETS in either layout (transformers 5 names Mistral3's `model.language_model.layers`):
# a regex, so a peft adapter leaves the vision tower's own q_proj, v_proj and down_proj alone
LANGUAGE_TARGETS = r"model\.(language_model\.)?layers\.\d+\.(self_attn\.(q_proj|v_proj)|mlp\.down_proj)"


@pytest.fixture(scope="module", params=list(CASES))
def family(request, tmp_path_factory) -> tuple[str, Path]:
    """(case, folder): the case's transformers model saved by transformers, with tokenizer.model beside it."""
    folder = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    CASES[request.param]().save_pretrained(folder)
    return request.param, with_tokenizer_model(folder, "v1")


def _transformers(folder: Path) -> transformers.PreTrainedModel:
    """The folder as transformers loads it (the class its config.json names)."""
    architecture = json.loads((folder / "config.json").read_text())["architectures"][0]
    return getattr(transformers, architecture).from_pretrained(folder).eval()


def _lines(source: Path, dest: Path, n: int) -> str:
    dest.write_text("\n".join(source.read_text().splitlines()[:n]) + "\n")
    return str(dest)


def _run(tmp_path: Path, folder: Path, name: str, *, kind: str = "lora", objective: str = "sft",
         **trainer: Any) -> RunConfig:
    """A short run on `folder`: packed rows of 32 tokens, rank-8 adapters on TARGETS."""
    spec = dict(objective=objective, max_steps=2, max_seq_len=32, batch_size=2, lr=2e-2, warmup_steps=0,
                weight_decay=0.0, log_every=1, sample_max_new_tokens=1, eval_max_new_tokens=0)
    if objective == "dpo":
        data = DataSpec(path=_lines(bundled_pairs_path(), tmp_path / "pairs.jsonl", 8), format="preference")
        spec.update(lr=1e-3, dpo=DPOSpec(beta=0.5))
    else:
        data = DataSpec(path=_lines(bundled_chat_path(), tmp_path / "chat.jsonl", 16), format="messages", packing=True)
    spec.update(trainer)
    return RunConfig(model=ModelSpec(path=str(folder)), data=data, trainer=TrainerSpec(**spec),
                     adapter=AdapterSpec(kind=kind, r=8, alpha=16, target_modules=list(TARGETS)),
                     run=RunSpec(name=name, dir=str(tmp_path)), tracking=TrackingSpec(progress_bar=False, plot=False))


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def _ids(seed: int = 3, length: int = 20) -> torch.Tensor:
    """Prompt ids past the tiny cases' sliding windows and original context (8, 16 tokens)."""
    return torch.randint(3, 32000, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def lora_run(family, tmp_path_factory) -> tuple[str, Path, Path]:
    """(case, folder, run dir) of a 2-step LoRA SFT run on packed rows with a checkpoint after step 1."""
    case, folder = family
    tmp = tmp_path_factory.mktemp(f"{case}_lora")
    return case, folder, fit(_run(tmp, folder, "lora", save_every=1))


def test_lora_sft_on_packed_rows_trains_the_named_targets(lora_run):
    _, _, run_dir = lora_run
    losses = _losses(run_dir)
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    saved = load_file(run_dir / "final" / "adapter_model.safetensors")
    named = {key.split(".")[-3] for key in saved}  # ...layers.0.self_attn.q_proj.lora_A.weight
    assert named == set(TARGETS)
    assert all(float(t.abs().max()) > 0 for key, t in saved.items() if "lora_B" in key)  # every adapter moved
    assert (run_dir / "checkpoints" / "step_1" / "adapter_model.safetensors").is_file()


def test_resume_from_the_checkpoint_continues_exactly(lora_run, tmp_path):
    _, folder, full = lora_run
    cut = tmp_path / "cut"
    shutil.copytree(full / "checkpoints" / "step_1", cut / "checkpoints" / "step_1")
    resumed = fit(dataclasses.replace(_run(tmp_path, folder, "cut", save_every=1), resume="latest"))
    a, b = (load_file(run / "final" / "adapter_model.safetensors") for run in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(resumed) == _losses(full)[1:]


def test_merge_writes_a_folder_transformers_loads_with_the_adapter_models_logits(lora_run, tmp_path):
    _, folder, run_dir = lora_run
    assert main(["merge", str(run_dir / "final"), "--out", str(tmp_path / "merged")]) == 0
    source, merged = (json.loads((f / "config.json").read_text()) for f in (folder, tmp_path / "merged"))
    assert (merged["architectures"], merged["model_type"]) == (source["architectures"], source["model_type"])
    ours = load_adapter(Mistral.from_pretrained(folder), run_dir / "final").eval()
    ids = _ids()
    with torch.no_grad():
        expected, got = ours(ids), _transformers(tmp_path / "merged")(ids).logits
        assert max_abs(got, expected) <= LOGIT_TOL
        assert max_abs(_transformers(folder)(ids).logits, expected) > 1e-3  # the adapter changed the model


def test_our_adapter_loads_in_peft_with_equal_logits(lora_run):
    _, folder, run_dir = lora_run
    theirs = peft.PeftModel.from_pretrained(_transformers(folder), run_dir / "final").eval()
    ours = load_adapter(Mistral.from_pretrained(folder), run_dir / "final").eval()
    ids = _ids()
    with torch.no_grad():
        assert max_abs(ours(ids), theirs(input_ids=ids).logits) <= LOGIT_TOL


def test_a_peft_adapter_loads_in_ours_with_equal_logits(family, tmp_path):
    _, folder = family
    torch.manual_seed(1)  # init_lora_weights=False: random A and B, so the adapter changes the logits
    theirs = peft.get_peft_model(_transformers(folder), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=LANGUAGE_TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(Mistral.from_pretrained(folder), tmp_path / "peft").eval()
    ids = _ids()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        assert max_abs(ours(ids), expected) <= LOGIT_TOL
        assert max_abs(Mistral.from_pretrained(folder).eval()(ids), expected) > 1e-3


def test_qlora_sft_step_gives_every_adapter_a_gradient(family, tmp_path):
    _, folder = family
    run_dir = fit(_run(tmp_path, folder, "qlora", kind="qlora", max_steps=1))
    note = json.loads((run_dir / "final" / "mistral_train_base.json").read_text())
    saved = load_file(run_dir / "final" / "adapter_model.safetensors")
    assert note["quantize"] == "nf4"
    # lora_B starts at zero: after one AdamW step it is non-zero exactly where a gradient reached it
    assert saved and all(float(t.abs().max()) > 0 for key, t in saved.items() if "lora_B" in key)


def test_one_dpo_step_starts_at_ln2_and_moves_the_adapter(family, tmp_path):
    _, folder = family
    run_dir = fit(_run(tmp_path, folder, "dpo", objective="dpo", max_steps=1))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # the policy is its reference at step 1
    assert "rewards/margins" in rows[0]
    saved = load_file(run_dir / "final" / "adapter_model.safetensors")
    assert any(float(t.abs().max()) > 0 for key, t in saved.items() if "lora_B" in key)


def test_greedy_generation_equals_transformers(family):
    _, folder = family
    prompt = _ids(length=12)[:1]
    ours = generate(Mistral.from_pretrained(folder).eval(), prompt, max_new_tokens=10, eos_token_id=-1)
    with torch.no_grad():
        theirs = _transformers(folder).generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None,
                                                pad_token_id=0)
    assert ours.shape == (1, 22) and torch.equal(ours, theirs)  # 22 tokens: past every tiny window and context


def test_plan_counts_the_folders_parameters(family):
    _, folder = family
    cfg = RunConfig(model=ModelSpec(path=str(folder), dtype="bfloat16"), adapter=AdapterSpec(kind="qlora"))
    plan = plan_run(cfg)
    # a vision tower and projector are counted as carried untouched (no device memory); the rest is the model
    assert plan.weights.total + plan.carried == sum(p.numel() for p in _transformers(folder).parameters())
    assert (plan.carried > 0) == (json.loads((folder / "config.json").read_text())["model_type"] == "mistral3")
    assert plan.model.vocab_size == bundled("v1").vocab_size and plan.rows[0].fits
