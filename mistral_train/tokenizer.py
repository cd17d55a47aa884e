"""Tokenizers: load a SentencePiece model or an HF `tokenizer.json`, encode/decode text, and
encode Mistral chats ([INST] formats) with a mask over the assistant answers.

The chat encodings equal mistral-common 1.13's `encode_chat_completion`: the conversation is
built piece by piece exactly as mistral-common builds it (BOS, then each user turn and each
assistant answer + EOS tokenized on its own), so the assistant mask comes from the piece
boundaries, never from searching the ids.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Optional, Sequence, Union

import sentencepiece
import tokenizers

from mistral_train.jsonfile import read_json_object

KINDS = ("sentencepiece", "hf_json")
CHAT_FORMATS = ("v1", "v2", "v3")
ROLES = ("system", "user", "assistant")
_BUNDLED = {"v1": "tokenizer.model.v1", "v2": "mistral_instruct_tokenizer_240216.model.v2",
            "v3": "mistral_instruct_tokenizer_240323.model.v3"}
_FOLDER_FILES = (("tokenizer.model", "sentencepiece"), ("tokenizer.json", "hf_json"))


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
        if not any((folder / name).is_file() for name in ("tokenizer.model", "tokenizer.json")):
            raise FileNotFoundError(
                f"{folder}: no tokenizer.model or tokenizer.json; set model.tokenizer to a tokenizer file or bundled:v1|v2|v3"
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

    def __init__(self, path: Path):
        self.tok = tokenizers.Tokenizer.from_file(str(path))
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


def _resolve(path: Path, kind: Optional[str]) -> tuple[Path, str]:
    """(tokenizer file, kind) for a folder or a file; the kind of a bare file comes from its
    content (JSON starts with '{', a SentencePiece protobuf does not), never from its name."""
    if path.is_dir():
        for name, file_kind in _FOLDER_FILES:
            if (path / name).is_file() and kind in (None, file_kind):
                return path / name, file_kind
        wanted = " or ".join(f"{n} ({k})" for n, k in _FOLDER_FILES if kind in (None, k))
        raise FileNotFoundError(f"{path}: no {wanted} in this folder")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or folder; expected a folder holding tokenizer.model "
                                "or tokenizer.json, or the path of such a file")
    if kind is None:
        with path.open("rb") as handle:
            kind = "hf_json" if handle.read(256).lstrip().startswith(b"{") else "sentencepiece"
    return path, kind


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
                raise ValueError(f"{file}: {key}_token must be a string, an object with 'content', or null; got {value!r}")
            found[key] = (value, file)
    return found


def load_tokenizer(path: Union[str, Path], kind: Optional[str] = None) -> "Tokenizer":
    """Load `path`: a folder with tokenizer.model (SentencePiece) or tokenizer.json (HF
    tokenizers; tokenizer.model wins when both exist), or such a file under any name (e.g.
    `bundled_tokenizer_path("v3")`). `kind` ("sentencepiece" | "hf_json") forces the loader."""
    if kind not in (None, *KINDS):
        raise ValueError(f"tokenizer kind {kind!r} unknown; expected one of {KINDS} or None")
    path = Path(path).expanduser()
    file, kind = _resolve(path, kind)
    try:
        backend = _SentencePiece(file) if kind == "sentencepiece" else _HFJson(file)
    # tokenizers raises a bare Exception on parse errors, sentencepiece a RuntimeError/OSError
    except Exception as err:  # noqa: BLE001 - re-raised with the path and what was expected
        raise ValueError(f"{file}: cannot parse as a {kind} tokenizer ({err}); expected a SentencePiece "
                         "model or an HF tokenizers tokenizer.json") from err
    ids = dict(backend.defaults)
    for key, (token, origin) in (_config_tokens(path) if path.is_dir() else {}).items():
        if token is None:  # an explicit null: no pad token (BOS/EOS keep the model's own)
            ids[key] = None if key == "pad" else ids[key]
            continue
        ids[key] = backend.token_id(token)
        if ids[key] is None:
            raise ValueError(f"{origin}: {key}_token {token!r} is not in the vocabulary of {file}")
    for key in ("bos", "eos"):
        if ids[key] is None:
            raise ValueError(f"{file}: no {key.upper()} token found; name it as {key}_token in a "
                             "tokenizer_config.json beside the tokenizer")
    return Tokenizer(backend, file, kind, ids["bos"], ids["eos"], ids["pad"])


def _check_messages(messages: Sequence[dict], need_last_user: bool) -> None:
    """Raise ValueError (naming the message index) unless messages are an optional leading
    system message, then strictly alternating user/assistant turns starting with user."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"empty conversation: expected a non-empty list of messages, got {messages!r}")
    expected = "user"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i}: expected a dict with 'role' and 'content', got {m!r}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
        if role == "system" and i == 0:
            continue
        if role != expected:
            raise ValueError(f"message {i}: expected role {expected!r}, got {role!r} (roles must alternate "
                             "user/assistant, starting with user, after an optional leading system message)")
        if role == "assistant" and not content:
            raise ValueError(f"message {i}: assistant content is empty")
        expected = "assistant" if role == "user" else "user"
    last = messages[-1]["role"]
    if last == "system":
        raise ValueError(f"message {len(messages) - 1}: conversation has no user message after the system message")
    if need_last_user and last != "user":
        raise ValueError(f"message {len(messages) - 1}: conversation must end with a user message when "
                         f"add_generation_prompt=True, got {last!r}")


class Tokenizer:
    """Text <-> ids, plus Mistral chat encoding. `encode` adds BOS/EOS only when asked."""

    def __init__(self, backend: Union[_SentencePiece, _HFJson], path: Path, kind: str,
                 bos_id: int, eos_id: int, pad_id: Optional[int]):
        self._backend, self.path, self.kind = backend, path, kind
        self.vocab_size: int = backend.vocab_size
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        inst, end_inst = backend.token_id("[INST]"), backend.token_id("[/INST]")
        has_controls = None not in (inst, end_inst) and backend.is_special(inst) and backend.is_special(end_inst)
        self._inst = (inst, end_inst) if has_controls else None

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
        """`chat_format`, checked; None picks v3 when [INST]/[/INST] are control tokens, else v1."""
        if chat_format is None:
            return "v3" if self._inst else "v1"
        if chat_format not in CHAT_FORMATS:
            raise ValueError(f"chat_format {chat_format!r} unknown; expected one of {CHAT_FORMATS} or None")
        if chat_format != "v1" and not self._inst:
            raise ValueError(f"chat_format {chat_format!r} needs [INST]/[/INST] control tokens, which the "
                             f"tokenizer {self.path} lacks; use 'v1'")
        return chat_format

    def encode_chat(self, messages: Sequence[dict], chat_format: Optional[str] = None) -> tuple[list[int], list[bool]]:
        """(ids, assistant_mask) of a chat `[{"role": "system"|"user"|"assistant", "content": str}, ...]`;
        `mask[t]` is True exactly on the tokens of each assistant answer and the EOS closing it.
        v1: `<s>[INST] u [/INST] a</s>` with [INST] as text; v2/v3 (identical without tools):
        [INST]/[/INST] control ids around each user turn."""
        return self._encode_chat(messages, chat_format, need_last_user=False)

    def _encode_chat(self, messages: Sequence[dict], chat_format: Optional[str],
                     need_last_user: bool) -> tuple[list[int], list[bool]]:
        fmt = self.chat_format(chat_format)
        _check_messages(messages, need_last_user)
        system = messages[0]["content"] if messages[0]["role"] == "system" else ""
        turns = messages[1:] if messages[0]["role"] == "system" else messages
        users = [i for i, m in enumerate(turns) if m["role"] == "user"]
        # mistral-common 1.13 puts the system prompt in the FIRST user turn in v1, the LAST in v2/v3
        system_turn = users[0] if fmt == "v1" else users[-1]
        ids, mask = [self.bos_id], [False]
        for i, m in enumerate(turns):
            text = m["content"]
            if m["role"] == "user":
                if system and i == system_turn:
                    text = system + "\n\n" + text
                piece = (self._backend.encode(f"[INST] {text} [/INST]") if fmt == "v1"
                         else [self._inst[0], *self._backend.encode(text), self._inst[1]])
            else:  # v2/v3 drop trailing spaces of answers, v1 keeps them (as mistral-common)
                piece = self._backend.encode(text if fmt == "v1" else text.rstrip(" ")) + [self.eos_id]
            ids += piece
            mask += [m["role"] == "assistant"] * len(piece)
        return ids, mask

    def apply_chat_template(self, messages: Sequence[dict], chat_format: Optional[str] = None,
                            add_generation_prompt: bool = False) -> list[int]:
        """Ids of a chat. Mistral formats have no separate generation prompt (a prompt ends with
        [/INST]), so add_generation_prompt=True only insists the chat ends with a user turn."""
        return self._encode_chat(messages, chat_format, need_last_user=add_generation_prompt)[0]
