"""Tokenizers: load a SentencePiece model, a Tekken file or an HF `tokenizer.json`, encode/decode
text, and encode Mistral chats (formats v1 to v15, chat_formats.py) with a mask over what is trained.

The chat encodings equal mistral-common 1.13's `encode_chat_completion` in fine-tuning mode: the
conversation is built piece by piece exactly as mistral-common builds it (BOS, then each message
tokenized on its own), so the mask comes from the piece boundaries, never from searching the ids.
A tokenizer's own format is its version: a tekken file's `config.version`, the `.vN` ending
mistral-common gives its SentencePiece files (`tokenizer.model.v3`, `*.model.v7m1` is v7), else
the control tokens it has ([SYSTEM_PROMPT]: v7, [INST]: v3, none: v1); `chat_format=` overrides.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Optional, Sequence, Union

import json
import re
import warnings

import sentencepiece
import tokenizers

from mistral_train.tokenizer import chat_formats
from mistral_train.tokenizer.chat_messages import VERSIONS as CHAT_FORMATS
from mistral_train.jsonfile import check_file_size, read_json_object
from mistral_train.tokenizer.tekken import TEKKEN_PATTERN, Tekken, is_tekken_json
from mistral_train.errors import FolderError

KINDS = ("sentencepiece", "hf_json", "tekken")
# the Llama-3 split regex some Tekken models' tokenizer.json carry instead of Tekken's (transformers#42299)
_LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_FILE_VERSION = re.compile(r"\.(v\d+)(m\d+)?$")  # mistral-common's names: tokenizer.model.v3, *.model.v7m1
_BUNDLED = {"v1": "tokenizer.model.v1", "v2": "mistral_instruct_tokenizer_240216.model.v2",
            "v3": "mistral_instruct_tokenizer_240323.model.v3"}
_FOLDER_FILES = (("tekken.json", "tekken"), ("tokenizer.model", "sentencepiece"), ("tokenizer.json", "hf_json"))


def bundled_tokenizer_path(version: str = "v1") -> Path:
    """Path of a real Mistral SentencePiece file shipped inside the installed mistral-common
    (v1: Mistral-7B v0.1, 32000 vocab; v2/v3: 32768 vocab with [INST] control tokens)."""
    if version not in _BUNDLED:
        raise ValueError(f"bundled tokenizer version {version!r} unknown; expected one of {sorted(_BUNDLED)}")
    path = Path(str(resources.files("mistral_common") / "data" / _BUNDLED[version]))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed mistral-common")
    return path


def resolve_tokenizer_path(spec: Optional[str], model_folder: Optional[Union[str, Path]] = None) -> Path:
    """Where a run's tokenizer lives.

    Args:
        spec: `bundled:v1|v2|v3` (shipped in mistral-common), a file or folder, or None for the
            model folder's own tokenizer (bundled v1 when there is no model folder).
        model_folder: the HF model folder the run starts from, if any.
    """
    if spec is None:
        if model_folder is None:
            return bundled_tokenizer_path("v1")
        folder = Path(model_folder)
        if not any((folder / name).is_file() for name, _ in _FOLDER_FILES) and _native_sentencepiece(folder) is None:
            raise FileNotFoundError(
                f"{folder}: no tokenizer.model or tokenizer.json (nor tekken.json); set model.tokenizer to a tokenizer file or bundled:v1|v2|v3"
            )
        return folder
    if spec.startswith("bundled:"):
        return bundled_tokenizer_path(spec.split(":", 1)[1])
    return Path(spec)


class _SentencePiece:
    """SentencePiece backend: control tokens are never parsed out of text (as mistral-common)."""

    def __init__(self, path: Path):
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.vocab_size()
        self.defaults = {key: (i if i >= 0 else None) for key, i in
                         (("bos", self.sp.bos_id()), ("eos", self.sp.eos_id()), ("pad", self.sp.pad_id()))}

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)  # add_dummy_prefix etc. come from the model's own normalizer spec

    def token_id(self, token: str) -> Optional[int]:
        i = self.sp.piece_to_id(token)  # unknown pieces map to unk: check the round trip
        return i if self.sp.id_to_piece(i) == token else None

    def is_special(self, i: int) -> bool:
        return self.sp.IsControl(i)

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def decode(self, ids: list[int], skip_special: bool) -> str:
        if skip_special:
            return self.sp.decode(ids)  # control pieces decode to ""
        # decode runs of ordinary ids and splice the special pieces in between
        out, run = [], []
        for i in ids:
            if self.sp.IsControl(i):
                out += [self.sp.decode(run), self.sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(out + [self.sp.decode(run)])


class _HFJson:
    """`tokenizers` backend; special tokens written in text stay text, as in SentencePiece."""

    def __init__(self, path: Path, data: dict):
        self.tok = tokenizers.Tokenizer.from_str(json.dumps(_fix_tekken_regex(path, data)))
        self.tok.encode_special_tokens = True
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self._special = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        self.defaults = {"bos": self.token_id("<s>"), "eos": self.token_id("</s>"), "pad": None}

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def token_id(self, token: str) -> Optional[int]:
        return self.tok.token_to_id(token)

    def is_special(self, i: int) -> bool:
        return i in self._special

    def id_to_piece(self, i: int) -> str:
        return self.tok.id_to_token(i)

    def decode(self, ids: list[int], skip_special: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special)


def _fix_tekken_regex(path: Path, data: dict) -> dict:
    """`data` with Tekken's split regex where a Tekken tokenizer.json (Mistral's [INST] control
    tokens) carries the Llama-3 regex instead (transformers#42299): that regex splits digits in
    threes and English contractions apart, so ids differ from the model's own tokenizer."""
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    added = {t.get("content") for t in data.get("added_tokens", [])}
    for step in steps:
        if (step.get("type") == "Split" and step.get("pattern", {}).get("Regex") == _LLAMA3_PATTERN
                and {"[INST]", "[/INST]"} <= added):
            step["pattern"]["Regex"] = TEKKEN_PATTERN
            warnings.warn(f"{path}: the pre-tokenizer regex is the Llama-3 pattern, not Tekken's "
                          "(transformers#42299); using Tekken's pattern so ids match the model's tokenizer",
                          stacklevel=3)
    return data


def _resolve(path: Path, kind: Optional[str]) -> tuple[Path, str]:
    """(tokenizer file, kind) for a folder or a file; the kind of a bare file comes from its
    content (JSON starts with '{', a SentencePiece protobuf does not), never from its name."""
    if path.is_dir():
        for name, file_kind in _FOLDER_FILES:
            if (path / name).is_file() and kind in (None, file_kind):
                return path / name, file_kind
        native = _native_sentencepiece(path)
        if native is not None and kind in (None, "sentencepiece"):
            return native, "sentencepiece"
        wanted = " or ".join(f"{n} ({k})" for n, k in _FOLDER_FILES if kind in (None, k))
        raise FileNotFoundError(f"{path}: no {wanted} in this folder")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or folder; expected a folder holding tokenizer.model "
                                "or tokenizer.json, or the path of such a file")
    if kind is None:
        with path.open("rb") as handle:
            kind = "hf_json" if handle.read(256).lstrip().startswith(b"{") else "sentencepiece"
    return path, kind


def _native_sentencepiece(folder: Path) -> Optional[Path]:
    """The `tokenizer.model.vN` of a folder in Mistral's native format (model/native.py), else None; of several,
    the last by name, as mistral-common picks."""
    files = sorted(f for f in folder.glob("tokenizer.model.v*") if _FILE_VERSION.search(f.name))
    return files[-1] if files else None


def _config_tokens(folder: Path) -> dict[str, tuple[Optional[str], Path]]:
    """bos/eos/pad token strings named in special_tokens_map.json / tokenizer_config.json
    (read as JSON only; tokenizer_config.json wins, as transformers writes it last)."""
    found: dict[str, tuple[Optional[str], Path]] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = folder / name
        if not file.is_file():
            continue
        data = read_json_object(file)
        for key in ("bos", "eos", "pad"):
            if f"{key}_token" not in data:
                continue
            value = data[f"{key}_token"]
            value = value.get("content") if isinstance(value, dict) else value  # older files: AddedToken dicts
            if value is not None and not isinstance(value, str):
                raise FolderError(f"{file}: {key}_token must be a string, an object with 'content', or null; got {value!r}")
            found[key] = (value, file)
    return found


def load_tokenizer(path: Union[str, Path], kind: Optional[str] = None) -> "Tokenizer":
    """Load `path`: a folder with tekken.json, tokenizer.model (SentencePiece) or tokenizer.json (HF
    tokenizers), first found in that order, or such a file under any name (e.g. mistral-common's
    `tokenizer.model.v3`, `tekken_240911.json`). `kind` ("sentencepiece" | "hf_json" | "tekken")
    forces the loader."""
    if kind not in (None, *KINDS):
        raise ValueError(f"tokenizer kind {kind!r} unknown; expected one of {KINDS} or None")
    path = Path(path).expanduser()
    file, kind = _resolve(path, kind)
    check_file_size(file, what="a tokenizer file")  # before sentencepiece or tokenizers read it whole
    data = read_json_object(file) if kind != "sentencepiece" else {}
    if kind == "hf_json" and is_tekken_json(data) and not path.is_dir():
        kind = "tekken"  # a bare JSON file: its content says which
    try:
        if kind == "tekken":
            backend = Tekken(file)
        else:
            backend = _SentencePiece(file) if kind == "sentencepiece" else _HFJson(file, data)
    # tokenizers raises a bare Exception on parse errors, sentencepiece a RuntimeError/OSError
    except Exception as err:  # noqa: BLE001 - re-raised with the path and what was expected
        raise FolderError(f"{file}: cannot parse as a {kind} tokenizer ({err}); expected a SentencePiece "
                         "model, a tekken file or an HF tokenizers tokenizer.json") from err
    ids = dict(backend.defaults)
    for key, (token, origin) in (_config_tokens(path) if path.is_dir() else {}).items():
        if token is None:  # an explicit null: no pad token (BOS/EOS keep the model's own)
            ids[key] = None if key == "pad" else ids[key]
            continue
        ids[key] = backend.token_id(token)
        if ids[key] is None:
            raise FolderError(f"{origin}: {key}_token {token!r} is not in the vocabulary of {file}")
    for key in ("bos", "eos"):
        if ids[key] is None:
            raise FolderError(f"{file}: no {key.upper()} token found; name it as {key}_token in a "
                             "tokenizer_config.json beside the tokenizer")
    return Tokenizer(backend, file, kind, ids["bos"], ids["eos"], ids["pad"])


class Tokenizer:
    """Text <-> ids, plus Mistral chat encoding. `encode` adds BOS/EOS only when asked."""

    def __init__(self, backend: Union[_SentencePiece, _HFJson, Tekken], path: Path, kind: str,
                 bos_id: int, eos_id: int, pad_id: Optional[int]):
        self._backend, self.path, self.kind = backend, path, kind
        self.vocab_size: int = backend.vocab_size
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        # a v15 tekken file's model settings (allowed values, default), also baked into the folder's chat template
        self.settings_builder: Optional[dict] = getattr(backend, "model_settings_builder", None)
        self._vocab = chat_formats.Vocab(backend.encode, self.control_id, bos_id, eos_id, self.settings_builder)
        self.version = self._own_version()

    def control_id(self, token: str) -> Optional[int]:
        """Id of the control token `token` ("[INST]"), None when the vocabulary has it only as text or not at all."""
        i = self._backend.token_id(token)
        return i if i is not None and self._backend.is_special(i) else None

    def _own_version(self) -> str:
        if isinstance(self._backend, Tekken):
            return self._backend.version
        named = _FILE_VERSION.search(self.path.name)
        if named and named.group(1) in CHAT_FORMATS:
            return named.group(1)
        controls = {t for t in ("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]") if self.control_id(t) is not None}
        return "v1" if len(controls) < 2 or "[INST]" not in controls else "v7" if len(controls) == 4 else "v3"

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        return [self.bos_id] * bos + self._backend.encode(text) + [self.eos_id] * eos

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} out of range for the vocabulary of {self.vocab_size} ({self.path})")
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self._backend.decode(self._check_ids(ids), skip_special)

    def id_to_piece(self, token_id: int) -> str:
        return self._backend.id_to_piece(self._check_ids([token_id])[0])

    def chat_format(self, chat_format: Optional[str] = None) -> str:
        """`chat_format`, checked; None is the tokenizer's own version (see the module docstring)."""
        if chat_format is None:
            return self.version
        if chat_format not in CHAT_FORMATS:
            raise ValueError(f"chat_format {chat_format!r} unknown; expected one of {CHAT_FORMATS} or None")
        missing = [t for t in chat_formats.NEEDS[chat_format][:2] if self.control_id(t) is None]
        if missing:
            raise ValueError(f"chat_format {chat_format!r} needs {', '.join(missing)} control tokens, which the "
                             f"tokenizer {self.path} lacks; use 'v1'")
        return chat_format

    def encode_chat(self, messages: Sequence[dict], chat_format: Optional[str] = None, tools: Optional[list] = None,
                    reasoning_effort: Optional[str] = None) -> tuple[list[int], list[bool]]:
        """(ids, trained_mask) of OpenAI-form `messages` (system, user, assistant with content and/or
        tool_calls, tool with tool_call_id; see chat_messages.py) and tool definitions `tools`.
        `mask[t]` is True on the assistant tokens: answers, reasoning, tool calls and the EOS closing
        them, except for messages with weight 0. `reasoning_effort` is a v15 model setting."""
        return chat_formats.encode_chat(self._vocab, self.chat_format(chat_format), messages, tools, reasoning_effort)

    def apply_chat_template(self, messages: Sequence[dict], chat_format: Optional[str] = None,
                            add_generation_prompt: bool = False, tools: Optional[list] = None,
                            reasoning_effort: Optional[str] = None) -> list[int]:
        """Ids of a chat. Mistral formats have no separate generation prompt (a prompt ends with
        [/INST] or [/TOOL_RESULTS]), so add_generation_prompt=True only insists the chat ends with a
        user message or tool results."""
        if add_generation_prompt and messages and isinstance(messages[-1], dict) \
                and messages[-1].get("role") not in ("user", "tool"):
            raise ValueError(f"message {len(messages) - 1}: conversation must end with a user message (or tool "
                             f"results) when add_generation_prompt=True, got {messages[-1].get('role')!r}")
        return self.encode_chat(messages, chat_format, tools, reasoning_effort)[0]
