"""Tekken (Mistral's byte-level BPE, `tekken*.json`): load, encode, decode.

A tekken file holds base64 byte strings ranked by merge priority (`vocab`), the split regex
(`config.pattern`), and the special tokens that take the first `default_num_special_tokens` ids
(the file's `special_tokens` list, or for older files the twenty tokens every Tekken v3/v7 model
uses, padded with `<SPECIAL_n>` fillers). Ordinary token ids are the BPE rank plus that offset.

The BPE runs on tiktoken: on a 50 MB text it is faster than HF tokenizers here (see
scripts/bench_tokenizer.py and docs/benchmarks.md), and being the library mistral-common itself
uses, merges never differ. Long texts are cut at places where the split regex always cuts (a line
break followed by a letter) and encoded on several threads; tiktoken releases the GIL.
"""

from __future__ import annotations

import base64
import re
from concurrent.futures import ThreadPoolExecutor
from itertools import groupby
from pathlib import Path
from typing import Optional

import tiktoken

from mistral_train.jsonfile import read_json_object
from mistral_train.tokenizer.chat_messages import VERSIONS

# The special tokens of Tekken files written before the list moved into the file (Nemo, Pixtral);
# mistral-common 1.13 uses this same list for files without `special_tokens` (versions <= v7).
LEGACY_SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                   "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
                   "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                   "[TOOL_CONTENT]")
# the pattern every Tekken file ships; HF tokenizer.json files of some Tekken models carry the
# Llama-3 pattern instead (transformers#42299), which splits words differently
TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
                  r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
_PARALLEL_MIN_CHARS = 1 << 20  # below this, one thread is faster than cutting and joining
_CUT = re.compile(r"\n(?=[A-Za-z])")  # a regex piece always ends after a line break before a letter


class Tekken:
    """Text <-> ids with a tekken file; `decode` equals mistral-common's Tekkenizer byte for byte."""

    def __init__(self, path: Path, threads: int = 2):
        data = read_json_object(path)
        try:
            config, vocab = data["config"], data["vocab"]
            n_special, vocab_size = int(config["default_num_special_tokens"]), int(config["default_vocab_size"])
            pattern, version = config["pattern"], config.get("version")
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a tekken file ({err!r} missing or malformed); expected 'config' with "
                             "pattern, default_vocab_size, default_num_special_tokens, and 'vocab'") from err
        if version not in VERSIONS:
            raise ValueError(f"{path}: config.version {version!r} unknown; expected one of {VERSIONS}")
        specials = [t["token_str"] for t in data["special_tokens"]] if data.get("special_tokens") else list(LEGACY_SPECIALS)
        if len(set(specials)) != len(specials) or len(specials) > n_special:
            raise ValueError(f"{path}: special_tokens must be unique and at most default_num_special_tokens={n_special}")
        self.specials = specials + [f"<SPECIAL_{i}>" for i in range(len(specials), n_special)]
        ranks = {}
        for rank, entry in enumerate(vocab[: vocab_size - n_special]):
            if entry.get("rank") != rank:
                raise ValueError(f"{path}: vocab entry {rank} has rank {entry.get('rank')!r}; expected ranks 0, 1, 2, ...")
            ranks[base64.b64decode(entry["token_bytes"])] = rank
        self.path, self.version, self.pattern = path, version, pattern
        self.ranks = ranks  # ordinary token bytes -> BPE rank (tekken_json.py writes them as tokenizer.json)
        self.n_special, self.vocab_size = n_special, vocab_size
        self.model_settings_builder: Optional[dict] = data.get("model_settings_builder")
        self._special_ids = {token: i for i, token in enumerate(self.specials)}
        self._bpe = tiktoken.Encoding(name=path.stem, pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        self._threads = threads
        self.defaults = {"bos": self.token_id("<s>"), "eos": self.token_id("</s>"), "pad": self.token_id("<pad>")}

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; special tokens written in the text stay text."""
        if len(text) < _PARALLEL_MIN_CHARS or self._threads < 2:
            ranks = self._bpe.encode_ordinary(text)
        else:
            ranks = [r for part in self._encode_parts(text) for r in part]
        offset = self.n_special
        return [r + offset for r in ranks]

    def _encode_parts(self, text: str) -> list[list[int]]:
        """Cut at line breaks before a letter (the split regex always ends a piece there, and BPE
        never merges across pieces) into about 8 parts per thread, and encode them in parallel."""
        size = max(len(text) // (8 * self._threads), 1)
        cuts, start = [0], 0
        while True:
            found = _CUT.search(text, start + size)
            if found is None:
                break
            cuts.append(found.end())
            start = found.end()
        parts = [text[a:b] for a, b in zip(cuts, cuts[1:] + [len(text)])]
        with ThreadPoolExecutor(self._threads) as pool:
            return list(pool.map(self._bpe.encode_ordinary, parts))

    def token_id(self, token: str) -> Optional[int]:
        return self._special_ids.get(token)

    def is_special(self, i: int) -> bool:
        return i < self.n_special

    def id_to_piece(self, i: int) -> str:
        return self.specials[i] if i < self.n_special else self._bpe.decode([i - self.n_special])

    def decode(self, ids: list[int], skip_special: bool) -> str:
        # each run of ordinary ids is decoded on its own (bytes split by a special token become
        # U+FFFD on both sides), as mistral-common does
        out = []
        for special, run in groupby(ids, lambda i: i < self.n_special):
            if special:
                out += [] if skip_special else [self.specials[i] for i in run]
            else:
                out.append(self._bpe.decode([i - self.n_special for i in run], errors="replace"))
        return "".join(out)


def is_tekken_json(data: dict) -> bool:
    """True when a parsed JSON file is a tekken file (its content says so, not its name)."""
    return isinstance(data.get("config"), dict) and "pattern" in data["config"] and isinstance(data.get("vocab"), list)
