"""Staged recipes: command-line overrides reach the stages they are meant for, data of the wrong kind is
refused before anything is written, and each stage says where its data and model come from."""

import json

import pytest

from mistral_train.cli import main
from mistral_train.config import list_recipes
from mistral_train.errors import ConfigError
from mistral_train.train.run_data import read_data
from mistral_train.data.formats import resolve_format
from mistral_train.train.objectives import objective_entry
from mistral_train.train.stage_overrides import load_routed
from mistral_train.tokenizer.tokenizer import bundled_tokenizer_path, load_tokenizer
from mistral_train.train.stages import run_stages, stage_configs
from tests._chat import A, U


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def files(tmp_path):
    """A chat file (messages), a ShareGPT file, a pairs file and a text file, 24 rows each."""
    return {
        "chat": _jsonl(tmp_path / "chat.jsonl", [{"messages": [U(f"q{i}"), A(f"a{i}")]} for i in range(24)]),
        "sharegpt": _jsonl(tmp_path / "share.jsonl", [{"conversations": [{"from": "human", "value": f"q{i}"},
                                                                         {"from": "gpt", "value": f"a{i}"}]}
                                                       for i in range(24)]),
        "pairs": _jsonl(tmp_path / "prefs.jsonl", [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}
                                                   for i in range(24)]),
        "text": _jsonl(tmp_path / "text.jsonl", [{"text": f"The cat sat on mat number {i}."} for i in range(24)]),
    }


def _stages(recipe, overrides):
    return dict(stage_configs(load_routed(recipe, overrides)))


def _fmt(stage):  # the format the stage's data is read as when it is the bundled data
    return resolve_format(stage.data.format, stage.data.path, objective_entry(stage.trainer.objective).data_kind)


@pytest.mark.parametrize("recipe", ["tiny_lora_sft", "tiny_qlora_sft", "tiny_pretrain_sft"])
def test_a_chat_file_and_max_steps_reach_the_sft_stage_and_pretraining_keeps_the_bundled_text(files, recipe):
    stages = _stages(recipe, [f"data.path={files['chat']}", "trainer.max_steps=3"])
    sft, pretrain = stages["sft"], stages["pretrain"]
    assert (sft.data.path, sft.trainer.max_steps, sft.trainer.objective) == (files["chat"], 3, "sft")
    assert (pretrain.data.path, _fmt(pretrain), pretrain.trainer.max_steps) == (None, "text", 3)


def test_a_users_chat_file_replaces_the_stages_held_out_set_unless_one_is_given(files, tmp_path):
    # the default recipe's sft stage holds out the bundled task lists; a user's own chats are not scored on them
    assert _stages("tiny_pretrain_sft", [])["sft"].data.eval_path.endswith("tiny_tasks_eval.jsonl")
    sft = _stages("tiny_pretrain_sft", [f"data.path={files['chat']}"])["sft"]
    assert (sft.data.path, sft.data.eval_path) == (files["chat"], None)
    held = _jsonl(tmp_path / "held.jsonl", [{"messages": [U("q"), A("a")]}])
    sft = _stages("tiny_pretrain_sft", [f"data.path={files['chat']}", f"data.eval_path={held}"])["sft"]
    assert (sft.data.path, sft.data.eval_path) == (files["chat"], held)


def test_a_stage_key_beats_the_same_top_level_key_in_any_order(files):
    for overrides in (["trainer.max_steps=3", "stages.sft.trainer.max_steps=7"],
                      ["stages.sft.trainer.max_steps=7", "trainer.max_steps=3"]):
        stages = _stages("tiny_lora_sft", overrides)
        assert (stages["pretrain"].trainer.max_steps, stages["sft"].trainer.max_steps) == (3, 7)
    stages = _stages("tiny_dpo", ["trainer.lr=0.01", "stages.dpo.trainer.lr=0.002"])  # sections set lr: ours win
    assert [s.trainer.lr for s in stages.values()] == [0.01, 0.01, 0.002]


def test_a_stage_key_the_section_does_not_set_needs_no_plus():
    # pretrain's section is empty in tiny_pretrain_sft; `+` still works as before
    assert _stages("tiny_pretrain_sft", ["stages.pretrain.trainer.max_steps=5"])["pretrain"].trainer.max_steps == 5
    assert _stages("tiny_pretrain_sft", ["+stages.sft.trainer.batch_size=4"])["sft"].trainer.batch_size == 4


def test_pairs_go_to_the_dpo_stage_and_the_earlier_stages_keep_their_data(files):
    stages = _stages("tiny_dpo", [f"data.path={files['pairs']}"])
    assert stages["dpo"].data.path == files["pairs"]
    assert [(s.data.path, _fmt(s)) for s in (stages["pretrain"], stages["sft"])] == [(None, "text"), (None, "messages")]
    # and a chat file to its SFT stage, the DPO stage keeping the bundled pairs
    stages = _stages("tiny_dpo", [f"data.path={files['sharegpt']}", "data.eval_fraction=0.1"])
    assert (stages["sft"].data.path, stages["sft"].data.eval_fraction) == (files["sharegpt"], 0.1)
    assert (stages["dpo"].data.path, _fmt(stages["dpo"]), stages["dpo"].data.eval_fraction) == (None, "preference", 0.0)


def test_text_goes_to_pretraining_only(files):
    stages = _stages("tiny_pretrain_sft", [f"data.path={files['text']}"])
    assert stages["pretrain"].data.path == files["text"]
    assert stages["sft"].data.path.endswith("tiny_tasks.jsonl")  # the recipe's own fine-tuning data


def test_data_keys_that_name_no_kind_reach_every_stage():
    stages = _stages("tiny_pretrain_sft", ["data.eval_fraction=0.1"])
    assert [s.data.eval_fraction for s in stages.values()] == [0.1, 0.1]


def test_a_file_no_stage_reads_names_each_stage_and_its_kind(files):
    with pytest.raises(ConfigError) as err:
        load_routed("tiny_pretrain_sft", [f"data.path={files['pairs']}"])
    assert str(err.value) == (
        f"data.path {files['pairs']} holds preference pairs, which no stage of recipe 'tiny_pretrain_sft' reads: "
        "stage pretrain reads plain text (trainer.objective=pretrain); stage sft reads chat rows "
        "(trainer.objective=sft); to fine-tune on the prompts and chosen answers only, set data.format=chosen_only")
    # a stage left out because model.path is given does not read it either
    with pytest.raises(ConfigError, match="stage dpo reads preference pairs .*; stages pretrain and sft are left out"):
        load_routed("tiny_dpo", [f"data.path={files['chat']}", "model.path=/models/sft"])


def test_chosen_only_sends_a_pairs_file_to_the_sft_stage(files):
    stages = _stages("tiny_lora_sft", [f"data.path={files['pairs']}", "data.format=chosen_only"])
    assert (stages["sft"].data.path, stages["sft"].data.format) == (files["pairs"], "chosen_only")
    assert (stages["pretrain"].data.path, stages["pretrain"].data.format) == (None, "auto")


def test_sft_on_a_pairs_file_is_refused_naming_the_file_and_the_opt_in(files):
    # one run (tiny_sft): fit() refuses it where it reads the data, before the model is built or a folder written
    tokenizer = load_tokenizer(bundled_tokenizer_path())
    cfg = load_routed("tiny_sft", [f"data.path={files['pairs']}", "data.packing=false"])
    with pytest.raises(ValueError, match=f"^data.path {files['pairs']} holds preference pairs, but "
                                         "trainer.objective=sft .*set data.format=chosen_only"):
        read_data(cfg, tokenizer)
    cfg = load_routed("tiny_sft", [f"data.path={files['pairs']}", "data.packing=false", "data.format=chosen_only"])
    assert f"{files['pairs']}: format chosen_only" in "\n".join(read_data(cfg, tokenizer).summary)
    cfg = load_routed("mistral7b_reward", ["model.path=/m", f"data.path={files['chat']}", "data.eval_fraction=0"])
    with pytest.raises(ValueError, match=f"^data.path {files['chat']} holds chat rows, but trainer.objective=reward"):
        read_data(cfg, tokenizer)


def test_a_whole_adapter_group_skips_the_stage_that_trains_a_fresh_model():
    stages = _stages("tiny_lora_sft", ["adapter=qlora", "adapter.r=4"])
    assert (stages["pretrain"].adapter.kind, stages["sft"].adapter.kind, stages["sft"].adapter.r) == ("none", "qlora", 4)
    assert stages["sft"].model.path.endswith("tiny_lora_sft/pretrain/final")  # still continues the pretraining


def test_model_path_stays_the_first_stages_start_and_the_chain_continues():
    stages = _stages("tiny_pretrain_sft", ["model.path=/models/base", "model.hidden_size=64"])
    assert stages["pretrain"].model.path == "/models/base"
    assert stages["sft"].model.path.endswith("tiny_pretrain_sft/pretrain/final")
    assert stages["sft"].model.hidden_size == 64


def test_misspelt_stage_names_and_keys_get_did_you_mean():
    with pytest.raises(ConfigError, match=r"^stages.sfx.trainer.max_steps: recipe 'tiny_pretrain_sft' has no stage "
                                          r"'sfx'; did you mean 'stages.sft'\? \(its stages: pretrain, sft\)"):
        load_routed("tiny_pretrain_sft", ["stages.sfx.trainer.max_steps=3"])
    with pytest.raises(ConfigError, match=r"^stages.sft: unknown key 'trainer.max_stepz'; did you mean 'trainer.max_steps'\?"):
        load_routed("tiny_pretrain_sft", ["stages.sft.trainer.max_stepz=3"])
    with pytest.raises(ConfigError, match="recipe 'tiny_sft' has no stages"):
        load_routed("tiny_sft", ["stages.sft.trainer.max_steps=3"])


def test_every_recipe_reads_its_data_with_format_auto():
    for recipe in list_recipes():  # data.path=null: the bundled data (a recipe for your data requires a path)
        run = load_routed(recipe, ["model.path=/m", "data.path=null"])
        assert run.data.format == "auto", recipe
        assert all(stage.data.format == "auto" for _, stage in stage_configs(run)), recipe


def test_each_stage_prints_where_its_data_and_model_come_from(files, tmp_path, capsys):
    cfg = load_routed("tiny_lora_sft", [f"data.path={files['sharegpt']}", f"run.dir={tmp_path}"])
    seen = []
    run_stages(cfg, lambda stage: seen.append(stage.run.name))
    assert seen == ["pretrain", "sft"]
    out = capsys.readouterr().out
    home = tmp_path / "tiny_lora_sft"
    assert (f"== stage pretrain: {home / 'pretrain'}\n   data:  bundled tiny_corpus.txt: plain text (format text, for "
            "the bundled data)\n   model: a fresh model (4 layers, hidden size 256: the model.* shape)\n") in out
    assert (f"== stage sft: {home / 'sft'}\n   data:  data.path {files['sharegpt']}: chat rows (format sharegpt, "
            f"decided from the first row of each file)\n   model: {home / 'pretrain' / 'final'} (what stage pretrain "
            "wrote); lora adapter: fresh\n") in out


def test_a_stage_with_data_of_the_wrong_kind_stops_the_run_before_anything_is_written(files, tmp_path):
    # built in Python, past load_run_config's checks: run_stages checks every stage before the first one trains
    cfg = load_routed("tiny_pretrain_sft", [f"run.dir={tmp_path}"])
    cfg.stages["sft"]["data"]["path"] = files["pairs"]
    ran = []
    with pytest.raises(ConfigError, match="^stage sft: data.path .*prefs.jsonl holds preference pairs"):
        run_stages(cfg, ran.append)
    assert ran == [] and not (tmp_path / "tiny_pretrain_sft").exists()


def test_a_first_stage_that_fails_on_its_data_leaves_no_run_folder(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"text": "two"}\n{"text": \n')  # line 3 is cut off
    home = tmp_path / "runs" / "tiny_pretrain_sft"
    try:  # the error is the user's: one line and status 2, or a ValueError where the CLI does not catch it
        status = main([f"data.path={bad}", f"run.dir={tmp_path / 'runs'}", "tracking.progress_bar=false"])
    except ValueError as err:
        status, message = None, str(err)
    else:
        message = capsys.readouterr().err
    assert status in (None, 2) and "bad.jsonl line 3: malformed JSON" in message
    assert not home.exists()


def test_cli_lora_recipe_trains_its_sft_stage_on_the_users_chat_file(files, tmp_path, capsys):
    short = ["trainer.max_seq_len=64", "trainer.batch_size=2", "tracking.progress_bar=false", "tracking.plot=false",
             "model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
             "trainer.sample_max_new_tokens=2", "trainer.eval_max_new_tokens=2"]
    assert main(["recipe=tiny_lora_sft", f"run.dir={tmp_path}", f"data.path={files['sharegpt']}",
                 "trainer.max_steps=2", *short]) == 0
    home = tmp_path / "tiny_lora_sft"
    sft = (home / "sft" / "config.yaml").read_text()
    assert f"path: {files['sharegpt']}" in sft and "max_steps: 2" in sft
    pretrain = (home / "pretrain" / "config.yaml").read_text()
    assert f"path: {files['sharegpt']}" not in pretrain and "max_steps: 2" in pretrain
    sft_metrics = [json.loads(line) for line in (home / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in sft_metrics) == 2
    assert "share.jsonl: format sharegpt" in capsys.readouterr().out  # the SFT stage read the user's rows


def test_data_follows_an_objective_changed_on_the_command_line(files):
    # every stage trained as SFT: the chat file goes to both, model.path chaining as before
    stages = _stages("tiny_pretrain_sft", ["trainer.objective=sft", f"data.path={files['chat']}"])
    assert [(s.trainer.objective, s.data.path) for s in stages.values()] == [("sft", files["chat"])] * 2
    stages = _stages("tiny_pretrain_sft", ["stages.pretrain.trainer.objective=sft", f"data.path={files['chat']}"])
    assert [s.data.path for s in stages.values()] == [files["chat"]] * 2
