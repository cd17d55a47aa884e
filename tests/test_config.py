"""Composing run configurations: recipes, groups, overrides and the errors users see."""

import dataclasses
import shutil
import typing
from pathlib import Path

import pytest
import yaml

from mistral_train import config as config_module
from mistral_train.errors import ConfigError
from mistral_train.config import (
    CONFIG_ROOT_ENV,
    RunConfig,
    config_root,
    dump_run_config,
    list_recipes,
    load_run_config,
    read_run_config,
)

REPO = Path(config_module.__file__).resolve().parents[1]
# Values a recipe marks `${required:...}`: the tests supply them so every recipe composes.
REQUIRED = {name: ["model.path=/models/Mistral-7B-v0.1", "data.path=/data/corpus"]
            for name in ("mistral7b_continued_pretrain", "mistral7b_full_sft", "mistral7b_lora_sft", "mistral7b_qlora_sft",
                         "mistral7b_qlora_dpo", "mistral7b_reward", "mistral7b_full_sft_fsdp2", "mistral7b_full_sft_zero3",
                         "mistral7b_qlora_sft_ddp", "mistral_nemo_qlora_sft", "mistral_small_24b_qlora_sft",
                         "ministral3_8b_qlora_sft", "mistral_small3_qlora_sft", "mixtral_8x7b_qlora_sft",
                         "mistral_small4_qlora_sft", "mistral7b_qlora_grpo", "mistral_nemo_qlora_tool_grpo")}


@pytest.fixture
def config_copy(tmp_path, monkeypatch):
    """A private copy of configs/ + recipes/, selected through $MISTRAL_TRAIN_CONFIG_ROOT."""
    for name in ("configs", "recipes"):
        shutil.copytree(REPO / name, tmp_path / name)
    monkeypatch.setenv(CONFIG_ROOT_ENV, str(tmp_path))
    return tmp_path


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_recipes_found_next_to_package():
    assert config_root() == REPO
    assert {"tiny_pretrain", "mistral7b_continued_pretrain"} <= set(list_recipes())


@pytest.mark.parametrize("recipe", list_recipes(REPO))
def test_every_recipe_composes_into_typed_dataclasses(recipe):
    cfg = load_run_config(recipe, REQUIRED.get(recipe, []))
    assert isinstance(cfg, RunConfig)
    for name, kind in typing.get_type_hints(RunConfig).items():
        if dataclasses.is_dataclass(kind):  # every group arrives as its schema dataclass, not a dict
            assert type(getattr(cfg, name)) is kind, name
    assert cfg.run.name == recipe  # each recipe names its run after itself


def test_tiny_recipe_takes_the_tiny_model_file():
    cfg = load_run_config()
    tiny = _yaml(REPO / "configs" / "model" / "tiny.yaml")
    for key, value in tiny.items():
        if key != "defaults":
            assert getattr(cfg.model, key) == value, key
    assert cfg.model.path is None and cfg.data.path is None and cfg.adapter.kind == "none"


def test_mistral7b_recipe_values_and_model_folder_tokenizer():
    cfg = load_run_config("mistral7b_continued_pretrain", REQUIRED["mistral7b_continued_pretrain"])
    assert cfg.model.path == "/models/Mistral-7B-v0.1"
    assert cfg.model.tokenizer is None  # null: the tokenizer inside the model folder
    assert (cfg.model.dtype, cfg.trainer.precision, cfg.model.gradient_checkpointing) == ("bfloat16", "bf16", True)
    assert cfg.trainer.device == "cuda"


def test_required_values_are_named_when_missing():
    with pytest.raises(ConfigError, match=r"model\.path .*data\.path.*pass model\.path=\.\.\. data\.path=\.\.\."):
        load_run_config("mistral7b_continued_pretrain")
    with pytest.raises(ConfigError, match=r"needs model\.path \(an HF Mistral folder") as info:
        load_run_config("mistral7b_continued_pretrain", ["data.path=/x"])
    assert "data.path" not in str(info.value)


def test_design_overrides_reach_the_dataclass():
    cfg = load_run_config(overrides=[
        "model.path=/m", "data.path=/d.txt", "data.format=text", "trainer.max_steps=7", "trainer.max_seq_len=64",
        "adapter=none", "run.dir=/tmp/runs", "run.name=x", "resume=/tmp/runs/x/checkpoints/step_5",
    ])
    assert (cfg.model.path, cfg.data.path, cfg.data.format) == ("/m", "/d.txt", "text")
    assert (cfg.trainer.max_steps, cfg.trainer.max_seq_len) == (7, 64)
    assert (cfg.adapter.kind, cfg.run.dir, cfg.run.name) == ("none", "/tmp/runs", "x")
    assert cfg.resume == "/tmp/runs/x/checkpoints/step_5"


def test_data_path_list_and_resume_flag():
    # one run: a staged recipe reads the files to route them (train/stage_overrides.py), and these do not exist
    cfg = load_run_config("tiny_pretrain", ["data.path=[a.txt,b/]", "resume=true"])
    assert cfg.data.path == ["a.txt", "b/"] and cfg.resume == "true"
    assert load_run_config(overrides=["resume=false"]).resume is None
    with pytest.raises(ConfigError, match="data.path must be a path or a list of paths"):
        load_run_config(overrides=["data.path=3"])


@pytest.mark.parametrize("override, key, suggestion", [
    ("trainer.max_stepz=5", "trainer.max_stepz", "trainer.max_steps"),
    ("model.hiden_size=3", "model.hiden_size", "model.hidden_size"),
    ("+trainer.max_stepz=5", "trainer.max_stepz", "trainer.max_steps"),  # `+` bypasses struct mode
    ("runn.name=x", "runn", "run"),
])
def test_misspelt_override_names_key_and_suggests(override, key, suggestion):
    with pytest.raises(ConfigError) as info:
        load_run_config(overrides=[override])
    message = str(info.value)
    assert f"unknown key '{key}'" in message and f"did you mean '{suggestion}'" in message
    assert "\n" not in message


def test_misspelt_key_in_recipe_yaml_names_key_and_file(config_copy):
    (config_copy / "recipes" / "typo.yaml").write_text(
        "defaults:\n  - run_schema\n  - model: tiny\n  - _self_\ntrainer:\n  max_stepz: 5\n")
    with pytest.raises(ConfigError, match=r"unknown key 'trainer\.max_stepz'.*typo\.yaml"):
        load_run_config("typo")


def test_misspelt_key_in_group_yaml_names_key_and_file(config_copy):
    tiny = (config_copy / "configs" / "model" / "tiny.yaml").read_text()
    (config_copy / "configs" / "model" / "typo.yaml").write_text(tiny + "hiden_size: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'model\.hiden_size'.*configs/model/typo\.yaml"):
        load_run_config(overrides=["model=typo"])


def test_invalid_yaml_names_file(config_copy):
    (config_copy / "recipes" / "broken.yaml").write_text("trainer:\n  lr: 1\n bad: [\n")
    with pytest.raises(ConfigError, match=r"invalid YAML.*broken\.yaml"):
        load_run_config("broken")


@pytest.mark.parametrize("override, key", [
    ("trainer.max_steps=abc", "trainer.max_steps"),
    ("trainer.lr=fast", "trainer.lr"),
    ("run.name=null", "run.name"),
])
def test_wrong_type_names_key(override, key):
    with pytest.raises(ConfigError, match=f"bad value for '{key}'"):
        load_run_config(overrides=[override])


def test_group_choice_none_works_and_bogus_lists_options():
    assert load_run_config(overrides=["adapter=none"]).adapter.kind == "none"
    options = sorted(p.stem for p in (REPO / "configs" / "adapter").glob("*.yaml"))
    with pytest.raises(ConfigError) as info:
        load_run_config(overrides=["adapter=bogus"])
    assert "'bogus'" in str(info.value) and "group 'adapter'" in str(info.value)
    assert f"available: {', '.join(options)}" in str(info.value)


def test_tracking_group_switches_trackers():
    assert load_run_config(overrides=["tracking=wandb"]).tracking.wandb is True
    assert load_run_config(overrides=["tracking=tensorboard"]).tracking.tensorboard is True


def test_unknown_recipe_lists_recipes():
    with pytest.raises(ConfigError, match="unknown recipe 'nope'; available: .*tiny_pretrain"):
        load_run_config("nope")


def test_unparseable_override_is_named():
    with pytest.raises(ConfigError, match="cannot parse override 'trainer'"):
        load_run_config(overrides=["trainer"])


def test_missing_config_folders_point_to_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv(CONFIG_ROOT_ENV, str(tmp_path))
    with pytest.raises(ConfigError, match=f"no configs/ or recipes/ folder in .*{CONFIG_ROOT_ENV}"):
        load_run_config()


def test_dump_and_read_back_round_trip(tmp_path):
    cfg = load_run_config("mistral7b_continued_pretrain", REQUIRED["mistral7b_continued_pretrain"] + ["trainer.max_steps=3"])
    path = dump_run_config(cfg, tmp_path / "run" / "config.yaml")
    text = path.read_text()
    assert "${" not in text  # fully resolved: the required-value interpolation is written as its value
    assert read_run_config(path) == cfg
    assert _yaml(path)["model"]["path"] == "/models/Mistral-7B-v0.1"


def test_read_run_config_rejects_unknown_key(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("trainer:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match=r"config\.yaml: unknown key 'trainer\.max_stepz'"):
        read_run_config(path)
