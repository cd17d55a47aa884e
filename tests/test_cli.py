"""The `mistral-train` command: verbs, recipe selection, and how user errors are reported."""

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from mistral_train import Mistral
from mistral_train.cli import main, split_recipe
from mistral_train.config import load_run_config
from mistral_train.train.stage_overrides import load_routed
from mistral_train.errors import ConfigError
from tests._tiny import save_tiny_folder
from tests._tokenizers import bundled

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
    (["plot", "no/such/run"], "no/such/run does not exist"),
    (["generate", "no/such/folder", "--prompt", "x"], "no/such/folder does not exist"),
    (["merge", "no/such/adapter", "--out", "x"], "no/such/adapter does not exist"),
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
    assert fake_fit == [load_routed(recipe, overrides)]
    assert f"run directory: " in capsys.readouterr().out


def test_plot_redraws_loss_png(tmp_path, capsys):
    from mistral_train.tracking.metrics import MetricsLogger

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
    tokenizer = bundled("v1")
    folder = save_tiny_folder(tmp_path_factory.mktemp("tiny_hf"), seed=0, vocab_size=tokenizer.vocab_size,
                              hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                              num_key_value_heads=2, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
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
    from mistral_train.tokenizer.tokenizer import bundled_tokenizer_path

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


# ---- user errors end with one line and exit 2, and what needs no data is checked before any is read

CHAT_ROW = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n'


def _one_error_line(capsys) -> str:
    """stderr of a failed command: exactly one line `mistral-train: error: ...`, no traceback."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mistral-train: error: "), err
    return lines[0]


@pytest.fixture
def bad_data(tmp_path):
    """A chat file whose second row is not JSON: a run that reads it fails on that row."""
    path = tmp_path / "bad.jsonl"
    path.write_text(CHAT_ROW + "{not json\n")
    return path


def _train(tmp_path, *overrides: str) -> list[str]:
    return ["train", "recipe=tiny_sft", f"run.dir={tmp_path / 'runs'}", "trainer.max_steps=1", *overrides]


def test_bad_data_is_one_line_naming_the_file(tmp_path, bad_data, capsys):
    assert main(_train(tmp_path, f"data.path={bad_data}")) == 2
    line = _one_error_line(capsys)
    assert "bad.jsonl" in line and "malformed JSON" in line


@pytest.mark.parametrize("override, needle", [
    ("data.format=chatml", "data.format=chatml is unknown; expected one of text, alpaca, messages"),
    ("model.path=no/such/model", "model.path=no/such/model does not exist"),
    ("model.tokenizer=no/such/tokenizer.model", "model.tokenizer=no/such/tokenizer.model does not exist"),
    ("adapter=lora", "adapter=lora trains adapters on a pretrained base: set model.path"),
    ("adapter.path=no/such/adapter", "adapter.path=no/such/adapter does not exist"),
    ("trainer.optimizer=adam", "trainer.optimizer=adam is unknown; expected one of adamw, adamw_8bit"),
    ("model.dtype=fp16", "model.dtype=fp16 is unknown; expected one of float32, bfloat16, float16"),
    ("trainer.objective=dpo trainer.dpo.reference=adapter_off", "reference=adapter_off needs adapter=lora or qlora"),
])
def test_config_errors_come_before_the_data_is_read(tmp_path, bad_data, override, needle, capsys):
    # the data is bad too: the error names the config value, so the data was never read
    assert main(_train(tmp_path, f"data.path={bad_data}", *override.split())) == 2
    line = _one_error_line(capsys)
    assert needle in line and "bad.jsonl" not in line
    assert not (tmp_path / "runs").exists()


def test_model_path_that_is_an_adapter_says_how_to_use_it(tmp_path, tiny_folder, bad_data, capsys):
    adapter = _lora_adapter(tiny_folder[0], tmp_path / "adapter")
    assert main(_train(tmp_path, f"data.path={bad_data}", f"model.path={adapter}")) == 2
    line = _one_error_line(capsys)
    assert f"model.path={adapter} is a LoRA adapter folder" in line
    assert f"model.path={tiny_folder[0]} adapter=lora adapter.path={adapter}" in line and "mistral-train merge" in line


def test_model_path_of_another_family_is_refused_by_model_type(tmp_path, tiny_folder, bad_data, capsys):
    llama = tmp_path / "llama"
    shutil.copytree(tiny_folder[0], llama)
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    assert main(_train(tmp_path, f"data.path={bad_data}", f"model.path={llama}")) == 2
    line = _one_error_line(capsys)
    assert "model_type" in line and "'llama'" in line and "bad.jsonl" not in line


def test_existing_run_folder_is_one_line_before_the_data_is_read(tmp_path, bad_data, capsys):
    step = tmp_path / "runs" / "r" / "checkpoints" / "step_3"
    step.mkdir(parents=True)
    (step / "training_state.pt").write_bytes(b"")
    assert main(_train(tmp_path, f"data.path={bad_data}", "run.name=r")) == 2
    line = _one_error_line(capsys)
    assert "already holds checkpoints (newest: step_3)" in line and "resume=latest" in line


def test_no_cuda_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(_train(tmp_path, "trainer.device=cuda")) == 2
    assert "trainer.device=cuda but this machine has no CUDA device" in _one_error_line(capsys)


def test_staged_recipe_checks_every_stage_before_the_first_runs(tmp_path, capsys):
    assert main(["train", f"run.dir={tmp_path}", "stages.sft.data.format=chatml"]) == 2
    assert "stages.sft: data.format=chatml is unknown" in _one_error_line(capsys)
    assert not (tmp_path / "tiny_pretrain_sft" / "pretrain").exists()  # the pretrain stage never started


@pytest.mark.parametrize("where", ["flag_first", "flag_last", "env"])
def test_debug_shows_the_traceback(tmp_path, monkeypatch, where):
    argv = _train(tmp_path, "data.format=chatml")
    if where == "env":
        monkeypatch.setenv("MISTRAL_TRAIN_DEBUG", "1")
    else:
        argv = ["--debug", *argv] if where == "flag_first" else [*argv, "--debug"]
    with pytest.raises(ConfigError, match="data.format=chatml is unknown"):
        main(argv)


def test_debug_env_zero_keeps_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MISTRAL_TRAIN_DEBUG", "0")
    assert main(_train(tmp_path, "data.format=chatml")) == 2
    _one_error_line(capsys)


# ---- generate on an adapter or a classifier, merge --out, plot on a staged run, plan on one process

def _lora_adapter(base: Path, folder: Path) -> Path:
    """A LoRA adapter on `base` whose B matrices are not zero (so it changes the model), saved as peft does."""
    from mistral_train.adapters import LoraConfig, apply_lora, save_adapter

    model = Mistral.from_pretrained(base)
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    return save_adapter(model, folder, base_model_name_or_path=str(base))


def test_generate_on_an_adapter_equals_the_merged_model_and_merge_keeps_out(tiny_folder, tmp_path, capsys):
    base = tiny_folder[0]
    adapter, merged = _lora_adapter(base, tmp_path / "adapter"), tmp_path / "merged"
    assert main(["merge", str(adapter), "--out", str(merged)]) == 0
    capsys.readouterr()
    common = ["--prompt", "The cat", "--max-new-tokens", "8", "--device", "cpu"]
    outputs = {}
    for name, folder in (("adapter", adapter), ("merged", merged), ("base", base)):
        assert main(["generate", str(folder), *common]) == 0
        outputs[name] = capsys.readouterr().out
    assert outputs["adapter"] == outputs["merged"]
    assert outputs["adapter"] != outputs["base"]  # the adapter was applied, not left out

    before = (merged / "model.safetensors").read_bytes()
    assert main(["merge", str(adapter), "--out", str(merged)]) == 2
    line = _one_error_line(capsys)
    assert f"--out {merged} exists" in line and "--overwrite" in line
    assert (merged / "model.safetensors").read_bytes() == before
    assert main(["merge", str(adapter), "--out", str(merged), "--overwrite"]) == 0


def test_generate_on_an_adapter_without_its_base_asks_for_base(tiny_folder, tmp_path, capsys):
    adapter = _lora_adapter(tiny_folder[0], tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "gone/base"}))
    assert main(["generate", str(adapter), "--prompt", "x", "--device", "cpu"]) == 2
    line = _one_error_line(capsys)
    assert "'gone/base' is not an HF folder here" in line and "--base" in line
    assert main(["generate", str(adapter), "--base", str(tiny_folder[0]), "--prompt", "x", "--max-new-tokens", "2",
                 "--device", "cpu"]) == 0


def test_generate_on_a_reward_model_says_it_has_no_lm_head(tiny_folder, tmp_path, capsys):
    folder = tmp_path / "reward"
    Mistral(Mistral.from_pretrained(tiny_folder[0]).config, task="sequence_classification").save_pretrained(folder)
    assert main(["generate", str(folder), "--prompt", "x", "--device", "cpu"]) == 2
    line = _one_error_line(capsys)
    assert "is a reward model (sequence_classification)" in line and "no language-model head" in line


def test_plot_on_a_staged_run_lists_its_stages(tmp_path, capsys):
    for stage in ("pretrain", "sft"):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    assert main(["plot", str(tmp_path)]) == 2
    line = _one_error_line(capsys)
    assert "staged run" in line and str(tmp_path / "pretrain") in line and str(tmp_path / "sft") in line


def test_plan_calls_one_process_single(capsys):
    assert main(["plan"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert "single" in rows and "ddp" not in rows
    assert main(["plan", "num_processes=2"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert "ddp" in rows and "single" not in rows


DEEPSPEED_PROBE = """
import sys, torch
from mistral_train.config import TrainerSpec
from mistral_train.dist.accelerator import build_accelerator, release
if sys.argv[1] == "run":  # what fit() does: an Accelerator without DeepSpeed, then unwrap_model imports it
    accelerator = build_accelerator(TrainerSpec(device="cpu"))
    accelerator.unwrap_model(torch.nn.Linear(1, 1))
    release(accelerator)
else:  # the control: DeepSpeed imported on this machine as it is
    import deepspeed
"""


def test_deepspeed_accelerator_warning_only_when_deepspeed_runs():
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["PYTHONPATH"] = str(REPO)
    def output(mode: str) -> str:
        done = subprocess.run([sys.executable, "-c", DEEPSPEED_PROBE, mode], capture_output=True, text=True,
                              cwd=REPO, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout + done.stderr

    assert "Setting accelerator to CPU" not in output("run")
    if not torch.cuda.is_available():  # the warning this test looks for does appear without the fix
        assert "Setting accelerator to CPU" in output("control")


def _good_chat(tmp_path) -> Path:
    path = tmp_path / "chat.jsonl"
    path.write_text(CHAT_ROW * 16)
    return path


@pytest.mark.parametrize("damage, needle", [
    ("drop_tensor", "checkpoint lacks 1 tensor(s)"),
    ("truncate_weights", "not a readable safetensors file"),
    ("corrupt_tokenizer", "cannot parse as a sentencepiece tokenizer"),
])
def test_a_damaged_model_folder_is_one_line_naming_the_file(tmp_path, tiny_folder, damage, needle, capsys):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_folder[0], folder)
    weights = folder / "model.safetensors"
    if damage == "drop_tensor":
        tensors = load_file(weights)
        save_file({k: v for k, v in tensors.items() if k != "model.norm.weight"}, weights)
    elif damage == "truncate_weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    tokenizer = []
    if damage == "corrupt_tokenizer":
        (folder / "tokenizer.model").write_bytes(b"not a sentencepiece model")
        tokenizer = [f"model.tokenizer={folder / 'tokenizer.model'}"]
    assert main(_train(tmp_path, f"data.path={_good_chat(tmp_path)}", f"model.path={folder}", "trainer.batch_size=1",
                       *tokenizer)) == 2
    line = _one_error_line(capsys)
    assert needle in line and str(folder) in line
