"""Untrusted folders and data (issue 19 item 6): weights load from safetensors only; no torch.load without
weights_only=True and no trust_remote_code anywhere in the package; a folder's chat_template is never
rendered by us; names inside a folder that point out of it are refused; a config or tokenizer file of
absurd size or nesting fails with one clean line."""

from __future__ import annotations

import ast
import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import jinja2
import pytest
import torch
from safetensors.torch import load_file

import mistral_train
from mistral_train import Mistral
from mistral_train.config import DataSpec, RunConfig, TrainerSpec
from mistral_train.errors import ConfigError, FolderError
from mistral_train.folders import check_model_folder
from mistral_train.jsonfile import MAX_JSON_BYTES, read_json_object
from mistral_train.model.hf import CONVERT_COMMAND
from mistral_train.tokenizer.tokenizer import bundled_tokenizer_path, load_tokenizer
from mistral_train.train.run_data import read_data
from tests._tiny import SMALL, save_tiny_folder

PACKAGE = Path(mistral_train.__file__).parent
REPO = PACKAGE.parent
TINY = {**SMALL, "vocab_size": 128}


# ---- weights: safetensors only --------------------------------------------------------------------------

def run_command(command: str, monkeypatch) -> None:
    """Run a `python -c CODE ARGS...` line as the shell would split it, in this process (no second
    interpreter to start): CODE with sys.argv = ["-c", ARGS...]."""
    python, flag, code, *args = shlex.split(command)
    assert (python, flag) == ("python", "-c")
    monkeypatch.setattr(sys, "argv", ["-c", *args])
    exec(compile(code, "<command>", "exec"), {"__name__": "__main__"})


def test_a_folder_of_pickled_weights_is_refused_naming_them_and_the_command_converts_it(tmp_path, monkeypatch):
    folder = save_tiny_folder(tmp_path / "pickled", **TINY)
    original = Mistral.from_pretrained(folder).state_dict()
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "extra.pt").write_bytes(b"never unpickled")
    with pytest.raises(FileNotFoundError, match=r"pickled weights \(extra\.pt, pytorch_model\.bin\)") as err:
        Mistral.from_pretrained(folder)
    assert CONVERT_COMMAND in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=rf"model.path={folder}: .*pytorch_model\.bin.*save_pretrained"):
        check_model_folder(str(folder))

    # the command the message gives works: transformers reads the pickle (weights_only) and writes safetensors
    (folder / "extra.pt").unlink()
    run_command(CONVERT_COMMAND.replace("OLD_FOLDER", shlex.quote(str(folder)))
                .replace("NEW_FOLDER", shlex.quote(str(tmp_path / "new"))), monkeypatch)
    converted = Mistral.from_pretrained(tmp_path / "new").state_dict()
    assert converted.keys() == original.keys()
    assert all(torch.equal(converted[name], original[name]) for name in original)


def test_a_pickled_adapter_is_refused_and_the_command_converts_it(tmp_path, monkeypatch):
    from mistral_train.adapters import LoraConfig, apply_lora, load_adapter, save_adapter
    from mistral_train.adapters.peft_format import ADAPTER_CONVERT_COMMAND
    from tests._tiny import tiny_model

    torch.manual_seed(0)
    model = apply_lora(tiny_model(), LoraConfig(r=4, alpha=8, target_modules="all-linear", init="none"))
    folder = save_adapter(model, tmp_path / "adapter", base_model_name_or_path="base")
    saved = load_file(folder / "adapter_model.safetensors")
    torch.save(saved, folder / "adapter_model.bin")  # what older peft versions wrote
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"only a pickled adapter_model.bin.*convert it to safetensors") as err:
        load_adapter(tiny_model(), folder)
    assert ADAPTER_CONVERT_COMMAND in str(err.value)
    run_command(ADAPTER_CONVERT_COMMAND.replace("ADAPTER_FOLDER", shlex.quote(str(folder))), monkeypatch)
    loaded = load_adapter(tiny_model(), folder).state_dict()
    lora = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(lora) > 0 and all(torch.equal(loaded[k], v) for k, v in lora.items())


# ---- the package's own source: no unpickling, no remote code ----------------------------------------------

def _package_sources() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50  # the walk found the package
    return files


def unsafe_loads(source: str, name: str = "<src>") -> list[str]:
    """Calls that unpickle what a file holds: torch.load without weights_only=True, pickle/dill/joblib loads."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        if func in ("torch.load", "torch.serialization.load"):
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            if not safe:
                found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
        elif re.fullmatch(r"(c?pickle|dill|joblib|cloudpickle)\.(loads?|Unpickler)", func):
            found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_checker_catches_an_unsafe_load():
    assert unsafe_loads("import torch\ntorch.load(f)\ntorch.load(f, weights_only=False)\npickle.loads(b)") == [
        "<src>:2: torch.load(f)", "<src>:3: torch.load(f, weights_only=False)", "<src>:4: pickle.loads(b)"]
    assert unsafe_loads("torch.load(f, map_location='cpu', weights_only=True)") == []


def test_torch_load_in_the_package_always_passes_weights_only_true():
    found, calls = [], 0
    for file in _package_sources():
        source = file.read_text()
        calls += source.count("torch.load(")
        found += unsafe_loads(source, str(file.relative_to(REPO)))
        # an alias (from torch import load; load = torch.load) would slip past the call check
        assert not re.search(r"from torch import .*\bload\b|=\s*torch\.load\b", source), file
    assert calls >= 1 and found == []  # checkpoint/state.py reads training_state.pt


def test_no_trust_remote_code_anywhere():
    found = []
    for file in _package_sources():
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                if not (isinstance(node.value, ast.Constant) and node.value.value is False):
                    found.append(f"{file}:{node.value.lineno}")
    for folder in ("configs", "recipes", "scripts"):
        for file in sorted((REPO / folder).rglob("*")):
            if file.is_file() and file.suffix in (".py", ".yaml", ".yml", ".json"):
                if re.search(r"trust_remote_code\W{1,4}(True|true|yes)", file.read_text()):
                    found.append(str(file))
    assert found == []


# ---- a folder's chat template is data, never code we run ---------------------------------------------------

def test_a_folders_chat_template_is_never_rendered(tmp_path):
    marker = tmp_path / "template_ran"
    template = ("{{ self.__init__.__globals__.__builtins__.open('" + str(marker) + "', 'w').write('x') }}"
                "{{ raise_exception('the template was rendered') }}")
    # the control: rendered by plain Jinja, the template writes the file and raises
    with pytest.raises(RuntimeError, match="rendered"):
        jinja2.Environment().from_string(template).render(
            raise_exception=lambda m: (_ for _ in ()).throw(RuntimeError(m)))
    assert marker.is_file()
    marker.unlink()

    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(bundled_tokenizer_path("v3"), folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<s>"}))
    (folder / "chat_template.jinja").write_text(template)
    tokenizer = load_tokenizer(folder)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ids, mask = tokenizer.encode_chat(messages)
    assert tokenizer.apply_chat_template(messages[:1]) == ids[: len(tokenizer.apply_chat_template(messages[:1]))]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": messages}) + "\n" for _ in range(4)))
    cfg = RunConfig(data=DataSpec(path=str(data), format="messages", packing=False),
                    trainer=TrainerSpec(objective="sft", max_seq_len=32, batch_size=2))
    batch = next(read_data(cfg, tokenizer).train)  # tokenized, audited and batched for training
    assert batch["input_ids"].shape[0] == 2 and any(mask)
    assert not marker.exists()


# ---- names inside a folder that point out of it ------------------------------------------------------------

@pytest.mark.parametrize("shard", ["../outside/model.safetensors", "/etc/model.safetensors", "pytorch_model.bin"])
def test_an_index_naming_a_shard_outside_the_folder_or_pickled_is_refused(tmp_path, shard):
    folder = save_tiny_folder(tmp_path / "model", **TINY)
    (tmp_path / "outside").mkdir()
    shutil.copy(folder / "model.safetensors", tmp_path / "outside" / "model.safetensors")  # a real file there
    names = load_file(folder / "model.safetensors").keys()
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: shard for k in names}}))
    with pytest.raises(FolderError, match=rf"model.safetensors.index.json: shard '{re.escape(shard)}' is not a "
                                          r"\.safetensors file inside the folder"):
        Mistral.from_pretrained(folder)


def _saved_dataset(folder: Path) -> Path:
    import datasets

    rows = {"messages": [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]] * 3}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(folder))
    return folder


def test_a_saved_dataset_naming_files_outside_itself_is_refused(tmp_path):
    from mistral_train.data.sources import load_rows

    folder = _saved_dataset(tmp_path / "ds")
    spec = DataSpec(path=str(folder), format="messages")
    assert len(load_rows(spec)) == 3  # the untouched folder reads
    state_file = folder / "train" / "state.json"
    state = json.loads(state_file.read_text())
    outside = tmp_path / "elsewhere.arrow"
    shutil.copy(folder / "train" / state["_data_files"][0]["filename"], outside)
    state["_data_files"][0]["filename"] = "../../elsewhere.arrow"
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=rf"{state_file}: data file '\.\./\.\./elsewhere\.arrow' is not a path inside"):
        list(load_rows(spec))
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": ["/tmp"]}))
    with pytest.raises(ValueError, match=r"dataset_dict.json: split '/tmp' is not a path inside"):
        list(load_rows(spec))


# ---- absurd sizes and depths ----------------------------------------------------------------------------------

def test_a_config_or_tokenizer_of_absurd_size_is_refused_before_reading(tmp_path, monkeypatch):
    folder = save_tiny_folder(tmp_path / "model", **TINY)
    with (folder / "config.json").open("r+b") as handle:
        handle.truncate(2**30 + 1)  # a sparse file of 1 GiB: nothing on disk, everything to a reader
    reads = []
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: reads.append(self))
    with pytest.raises(ConfigError, match=rf"model.path={folder}: {folder / 'config.json'}: 1024 MiB is too large for "
                                          rf"a JSON file \(the limit is {MAX_JSON_BYTES // 2**20} MiB\)"):
        check_model_folder(str(folder))
    with pytest.raises(FolderError, match="config.json: 1024 MiB is too large"):
        Mistral.from_pretrained(folder)
    tok = tmp_path / "tok"
    tok.mkdir()
    with (tok / "tokenizer.model").open("wb") as handle:
        handle.truncate(2**30 + 1)
    with pytest.raises(FolderError, match=r"tokenizer.model: 1024 MiB is too large for a tokenizer file"):
        load_tokenizer(tok)
    assert reads == []  # refused by size, never read


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_json_nested_too_deeply_is_one_clean_error(tmp_path, name):
    path = tmp_path / name
    path.write_text('{"a": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(FolderError, match=rf"{name}: JSON nested too deeply to read") as err:
        read_json_object(path) if name == "config.json" else load_tokenizer(tmp_path)
    assert "\n" not in str(err.value)


def test_a_data_row_nested_too_deeply_names_its_file_and_line(tmp_path):
    from mistral_train.data.sources import load_rows

    deep = '{"text": ' + "[" * 200_000 + "]" * 200_000 + "}"
    lines = tmp_path / "rows.jsonl"
    lines.write_text('{"text": "fine"}\n' + deep + "\n")
    with pytest.raises(ValueError, match=rf"^{lines} line 2: malformed JSON \(nested too deeply to read\)$"):
        list(load_rows(DataSpec(path=str(lines))))
    array = tmp_path / "rows.json"
    array.write_text("[" + deep + "]")
    with pytest.raises(ValueError, match=rf"^{array}: malformed JSON \(nested too deeply to read\)$"):
        list(load_rows(DataSpec(path=str(array))))


def test_a_safetensors_header_length_that_lies_is_refused_without_allocating_it(tmp_path):
    from mistral_train.model.vision_language import _tensor_sizes

    file = tmp_path / "model.safetensors"
    file.write_bytes((2**62).to_bytes(8, "little") + b"{}")
    with pytest.raises(FolderError, match=rf"{file}: not a readable safetensors file \(its header claims {2**62} "):
        list(_tensor_sizes(file))
