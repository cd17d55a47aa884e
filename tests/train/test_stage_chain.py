"""Stage resolution (train/stages.py: stage_configs) on hand-built configurations: which stages run when
model.path is given (if_no_model), and where each stage starts after a full or an adapter stage
(_continue_from). The recipe-level routing of overrides is tested in test_stages.py."""

import pytest

from mistral_train.config import AdapterSpec, ModelSpec, RunConfig, RunSpec
from mistral_train.errors import ConfigError
from mistral_train.train.stages import stage_configs

LORA = {"adapter": {"kind": "lora"}}
FULL = {"adapter": {"kind": "none"}}


def _resolve(stages: dict, model_path=None, **top) -> dict[str, RunConfig]:
    cfg = RunConfig(model=ModelSpec(path=model_path), run=RunSpec(dir="/runs", name="chain"), stages=stages, **top)
    return dict(stage_configs(cfg))


def test_if_no_model_stages_run_only_without_model_path():
    stages = {"pretrain": {"if_no_model": True}, "sft": {"if_no_model": True}, "dpo": {}}
    assert list(_resolve(stages)) == ["pretrain", "sft", "dpo"]
    given = _resolve(stages, model_path="/models/sft")
    assert list(given) == ["dpo"]
    assert given["dpo"].model.path == "/models/sft"  # the first stage that runs starts from the user's model


def test_a_stage_after_a_full_stage_starts_from_its_final_folder_unless_it_sets_model_path():
    chain = _resolve({"a": FULL, "b": FULL, "c": {"model": {"path": "/models/other"}}})
    assert [s.model.path for s in chain.values()] == [None, "/runs/chain/a/final", "/models/other"]
    assert [(s.run.dir, s.run.name) for s in chain.values()] == [("/runs/chain", n) for n in "abc"]


def test_an_adapter_stage_after_an_adapter_stage_keeps_the_base_and_continues_the_adapter():
    chain = _resolve({"sft": LORA, "dpo": LORA}, model_path="/models/base")
    assert (chain["dpo"].model.path, chain["dpo"].adapter.path) == ("/models/base", "/runs/chain/sft/final")
    own = _resolve({"sft": LORA, "dpo": {"adapter": {"kind": "lora", "path": "/adapters/mine"}}},
                   model_path="/models/base")
    assert (own["dpo"].model.path, own["dpo"].adapter.path) == ("/models/base", "/adapters/mine")


def test_a_full_stage_after_an_adapter_stage_starts_from_its_merged_folder_or_is_refused():
    merged = _resolve({"sft": {"adapter": {"kind": "lora", "merge_at_end": True}}, "full": FULL},
                      model_path="/models/base")
    assert merged["full"].model.path == "/runs/chain/sft/merged"
    with pytest.raises(ConfigError, match=r"^stages.full: trains every weight after an adapter stage; "
                                          r"set adapter.merge_at_end=true"):
        _resolve({"sft": LORA, "full": FULL}, model_path="/models/base")
    own = _resolve({"sft": LORA, "full": {"adapter": {"kind": "none"}, "model": {"path": "/models/x"}}},
                   model_path="/models/base")
    assert own["full"].model.path == "/models/x"


def test_an_adapter_stage_after_a_full_stage_adapts_its_final_folder():
    chain = _resolve({"pretrain": FULL, "sft": LORA}, adapter=AdapterSpec(kind="none"))
    assert (chain["sft"].model.path, chain["sft"].adapter.path) == ("/runs/chain/pretrain/final", None)
