"""The `mistral-train` command: verbs, recipe selection, and how user errors are reported."""

import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from mistral_train import Mistral, MistralConfig
from mistral_train.cli import main, split_recipe
from mistral_train.config import ConfigError, load_run_config

REPO = Path(__file__).resolve().parents[1]


def _module(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "mistral_train", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)


def test_module_config_prints_resolved_value():
    done = _module("config", "trainer.max_steps=3")
    assert done.returncode == 0, done.stderr
    printed = yaml.safe_load(done.stdout)
    assert printed["trainer"]["max_steps"] == 3
    assert printed["run"]["name"] == load_run_config().run.name


def test_module_config_error_is_one_line_exit_2():
    done = _module("trainer.max_steps=abc")  # bare overrides mean `train`: fails before training starts
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "trainer.max_steps" in lines[0] and lines[0].startswith("mistral-train: error:")


def test_unknown_verb_exits_2_listing_verbs(capsys):
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'frobnicate'" in err and "generate" in err and "plot" in err


@pytest.mark.parametrize("argv", [["generate"], ["generate", "some/folder"], ["plot"], ["--bogus-flag"],
                                  ["generate", "f", "--prompt", "x", "--top-k", "many"]])
def test_bad_usage_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: mistral-train" in capsys.readouterr().err


def test_help_lists_verbs(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for verb in ("train", "config", "generate", "plot"):
        assert verb in out


@pytest.mark.parametrize("argv, needle", [
    (["config", "trainer.max_stepz=5"], "unknown key 'trainer.max_stepz'"),
    (["config", "adapter=bogus"], "no option 'bogus' in config group 'adapter'"),
    (["config", "recipe=nope"], "unknown recipe 'nope'"),
    (["config", "recipe=tiny_pretrain", "recipe=mistral7b_continued_pretrain"], "recipe given 2 times"),
    (["plot", "no/such/run"], "metrics.jsonl does not exist"),
    (["generate", "no/such/folder", "--prompt", "x"], "not an HF model folder"),
])
def test_user_errors_print_one_line_and_return_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_split_recipe():
    assert split_recipe(["a.b=1", "recipe=x", "c=2"]) == ("x", ["a.b=1", "c=2"])
    assert split_recipe([])[0] == "tiny_pretrain_sft"
    with pytest.raises(ConfigError):
        split_recipe(["recipe=a", "recipe=b"])


@pytest.fixture
def fake_fit(monkeypatch, tmp_path):
    """Replace the training loop: `train` must hand it the composed RunConfig and print the run dir."""
    calls = []

    def fit(cfg):
        calls.append(cfg)
        return tmp_path / cfg.run.name

    monkeypatch.setitem(sys.modules, "mistral_train.train.loop", types.SimpleNamespace(fit=fit))
    return calls


@pytest.mark.parametrize("argv, recipe, overrides", [
    ([], "tiny_pretrain_sft", []),
    (["train"], "tiny_pretrain_sft", []),
    (["trainer.max_steps=4", "run.name=t"], "tiny_pretrain_sft", ["trainer.max_steps=4", "run.name=t"]),
    (["recipe=mistral7b_continued_pretrain", "model.path=/m", "data.path=/d"], "mistral7b_continued_pretrain", ["model.path=/m", "data.path=/d"]),
])
def test_train_runs_fit_with_composed_config(argv, recipe, overrides, fake_fit, capsys):
    assert main(argv) == 0
    assert fake_fit == [load_run_config(recipe, overrides)]
    assert f"run directory: " in capsys.readouterr().out


def test_plot_redraws_loss_png(tmp_path, capsys):
    from mistral_train.tracking import MetricsLogger

    with MetricsLogger(tmp_path) as log:
        for step in range(1, 6):
            log.log(step, {"loss": 5.0 / step, "lr": 1e-3})
    assert main(["plot", str(tmp_path)]) == 0
    png = tmp_path / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in capsys.readouterr().out


def test_plot_without_loss_rows_is_a_user_error(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lr": 0.1}\n')
    assert main(["plot", str(tmp_path)]) == 2
    assert "loss" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A small random model saved as an HF folder, without a tokenizer (the bundled v1 applies)."""
    from mistral_train.tokenizer import bundled_tokenizer_path, load_tokenizer

    tokenizer = load_tokenizer(Path(bundled_tokenizer_path("v1")))
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, bos_token_id=tokenizer.bos_id,
                        eos_token_id=tokenizer.eos_id)
    folder = tmp_path_factory.mktemp("tiny_hf")
    Mistral(cfg).save_pretrained(folder)
    return folder, tokenizer


@pytest.mark.parametrize("flags", [[], ["--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "3"]])
def test_generate_prints_what_generate_returns(tiny_folder, flags, capsys):
    from mistral_train.generate import generate

    folder, tokenizer = tiny_folder
    assert main(["generate", str(folder), "--prompt", "The cat", "--max-new-tokens", "6", "--device", "cpu", *flags]) == 0
    printed = capsys.readouterr().out
    model = Mistral.from_pretrained(folder).eval()
    sampling = dict(temperature=0.8, top_k=20, top_p=0.9) if flags else {}
    generator = torch.Generator().manual_seed(3 if flags else 0)
    ids = generate(model, tokenizer.encode("The cat", bos=True), 6, eos_token_id=tokenizer.eos_id,
                   generator=generator, **sampling)
    assert printed == tokenizer.decode(ids[0].tolist()) + "\n"
    assert printed.startswith("The cat")


def test_generate_chat_wraps_the_prompt_in_the_template(tiny_folder, capsys):
    from mistral_train.generate import generate

    folder, tokenizer = tiny_folder
    assert main(["generate", str(folder), "--chat", "--prompt", "Hi there", "--max-new-tokens", "3", "--device", "cpu"]) == 0
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True)
    ids = generate(Mistral.from_pretrained(folder).eval(), prompt, 3, eos_token_id=tokenizer.eos_id)
    printed = capsys.readouterr().out
    assert printed == tokenizer.decode(ids[0].tolist()) + "\n" and "[INST] Hi there [/INST]" in printed


def test_generate_prefers_the_folders_tokenizer(tiny_folder, tmp_path, capsys):
    from mistral_train.tokenizer import bundled_tokenizer_path

    folder, _ = tiny_folder
    own = tmp_path / "with_tokenizer"
    shutil.copytree(folder, own)
    shutil.copy(bundled_tokenizer_path("v1"), own / "tokenizer.model")
    common = ["--prompt", "The cat", "--max-new-tokens", "4", "--device", "cpu"]
    assert main(["generate", str(own), *common, "--tokenizer", "no/such/tokenizer.model"]) == 0  # not consulted
    with_own = capsys.readouterr().out
    assert main(["generate", str(folder), *common]) == 0
    assert with_own == capsys.readouterr().out


@pytest.mark.parametrize("tokenizer, needle", [("bundled:v9", "bundled:v9"), ("no/such/tokenizer.model", "no/such")])
def test_generate_bad_tokenizer_is_a_user_error(tiny_folder, tokenizer, needle, capsys):
    folder, _ = tiny_folder
    assert main(["generate", str(folder), "--prompt", "x", "--tokenizer", tokenizer]) == 2
    assert needle in capsys.readouterr().err
