"""Data sources -> the canonical rows of the train and eval splits, every row checked.

`data.path`: a file (.jsonl, .json, .parquet, .csv; .txt for format text), a folder written by
`datasets`' save_to_disk, a plain folder (its data files and saved datasets, recursively, sorted;
other and hidden files are not read; `RowSource.sources` lists what was), or a list of those. None:
the bundled `tiny_chat.jsonl` (eval `tiny_chat_eval.jsonl`) for chat formats, `tiny_pairs.jsonl` (eval
`tiny_pairs_eval.jsonl`) for preference pairs, `tiny_prompts.jsonl` (eval `tiny_prompts_eval.jsonl`) for
prompts (prompt_only), `tiny_unpaired.jsonl` (eval `tiny_unpaired_eval.jsonl`) for unpaired preferences, the tiny
corpus for
text. Rows pass through `formats.to_canonical` and gain "source" (file or saved folder) and "row",
numbered from 1 in every file type, as a user counts them: the line in JSON Lines, the element of
a JSON array, the row of Parquet, CSV (the header not counted) and saved datasets, the document in .txt.
JSON(L) is parsed here with `json`, line by line, for "FILE line N: malformed JSON (...)" and exact
JSON types; Parquet, CSV and saved datasets go through `datasets` (load_dataset, load_from_disk).

Held out: `eval_path` (a saved DatasetDict gives its validation/eval/test split), or `eval_fraction`:
row r of file f is held out when a hash of (seed, f's file name, r) is below the fraction: per row,
so deterministic, disjoint, the same with and without streaming, stable when rows are appended;
the count is near, not exactly, fraction * rows.

Mixing (`weights`, one per entry of `path`, applied after the hold-out so no eval row is copied into
training). Not streaming: of N training rows in all, entry i gives t_i = round(w_i / sum(w) * N),
drawn once from the seed: t_i <= n_i rows without replacement; else every row t_i // n_i times plus
t_i % n_i more without replacement. The list is fixed (not redrawn per epoch), each entry's rows in
file order; shuffling is the batcher's job. Streaming: each row comes from entry i with probability
w_i / sum(w) (seeded); an entry that runs out restarts, until every entry has run out once.
No weights: entries concatenated in order.

Streaming reads lazily on every pass (JSON Lines by line, Parquet/CSV via `datasets` streaming, saved
datasets as IterableDataset; a .json array or .txt file is still read whole), so errors surface
when the bad row is reached.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from importlib import resources
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from mistral_train.data.formats import FORMATS, KINDS, check_field_map, detect_format, format_kind, to_canonical
from mistral_train.data.spec import DataSpec
from mistral_train.data.text import bundled_corpus_path, read_txt
from mistral_train.jsonfile import read_json_object
from mistral_train.wording import counted

SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "txt"}
_EVAL_SPLITS = ("validation", "eval", "test")


@dataclass(frozen=True)
class _Unit:
    """One readable thing: a data file or a saved dataset folder (kind "disk")."""

    path: Path
    kind: str
    splits: tuple[str, ...] = ("train",)  # which split of a saved DatasetDict, in preference order

    @property
    def name(self) -> str:
        return str(self.path)


@dataclass
class RowSource:
    """The canonical rows of one split. Iterate for dicts; `len()` works unless streaming.

    `formats` maps each source to the format its rows were read as (the `auto` decision);
    `available` and `drawn` count rows per source before and after mixing (empty when streaming).
    """

    name: str
    sources: list[str]
    formats: dict[str, str]
    rows: Optional[list[dict[str, Any]]] = None
    available: dict[str, int] = field(default_factory=dict)
    drawn: dict[str, int] = field(default_factory=dict)
    stream: Optional[Callable[[], Iterator[dict[str, Any]]]] = None  # a fresh lazy pass when streaming

    @property
    def streaming(self) -> bool:
        return self.rows is None

    @property
    def kind(self) -> str:
        """"text", "chat" or "preference" (a split holds one kind; `load_splits` refuses a mix)."""
        return format_kind(next(iter(self.formats.values()), "chat"))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows) if self.rows is not None else self.stream()

    def __len__(self) -> int:
        if self.rows is None:
            raise TypeError(f"{self.name} is streamed: its length is known only after reading it")
        return len(self.rows)

    def describe(self) -> str:
        """One line per source: format, and rows drawn of rows available when known."""
        counts = lambda s: (  # noqa: E731
            f", {counted(self.drawn[s], 'row')} drawn of {self.available[s]}" if s in self.drawn else "")
        return "\n".join(f"{s}: format {self.formats[s]}{counts(s)}" for s in self.sources)


def bundled_chat_path(split: str = "train") -> Path:
    """The bundled chat rows (messages format): tiny_chat.jsonl, or tiny_chat_eval.jsonl for "eval"."""
    name = "tiny_chat_eval.jsonl" if split == "eval" else "tiny_chat.jsonl"
    return Path(str(resources.files("mistral_train") / "resources" / "data" / name))


def bundled_pairs_path(split: str = "train") -> Path:
    """The bundled preference pairs: tiny_pairs.jsonl, or tiny_pairs_eval.jsonl for "eval" (with answers)."""
    name = "tiny_pairs_eval.jsonl" if split == "eval" else "tiny_pairs.jsonl"
    return Path(str(resources.files("mistral_train") / "resources" / "data" / name))


def bundled_prompts_path(split: str = "train") -> Path:
    """The bundled prompts (prompt_only, with answers): tiny_prompts.jsonl, or tiny_prompts_eval.jsonl for "eval"."""
    name = "tiny_prompts_eval.jsonl" if split == "eval" else "tiny_prompts.jsonl"
    return Path(str(resources.files("mistral_train") / "resources" / "data" / name))


def bundled_unpaired_path(split: str = "train") -> Path:
    """The bundled unpaired preferences (KTO): tiny_unpaired.jsonl, or tiny_unpaired_eval.jsonl for "eval"
    (scripts/make_tiny_unpaired.py makes both from the bundled pairs)."""
    name = "tiny_unpaired_eval.jsonl" if split == "eval" else "tiny_unpaired.jsonl"
    return Path(str(resources.files("mistral_train") / "resources" / "data" / name))


def load_rows(spec: DataSpec, split: str = "train", seed: int = 0) -> Optional[RowSource]:
    """The rows of `split` ("train" | "eval") described by a DataSpec; None for "eval" when none is set."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return load_splits(spec, seed)[split == "eval"]


def source_formats(spec: DataSpec) -> tuple[str, dict[str, str]]:
    """(name, {source: format}) of the training data as `load_splits` would read it (the `auto` decision
    per source), reading one row per source: what a staged recipe checks and reports before training."""
    spec, name = _resolve(spec)
    return name, {u.name: _format(u, spec) for p in _as_list(spec.path) for u in _units(p, ("train",))}


def load_splits(spec: DataSpec, seed: int = 0) -> tuple[RowSource, Optional[RowSource]]:
    """(train, eval or None) from a DataSpec (fields path, format, weights, field_map, streaming,
    eval_path, eval_fraction); without streaming each file is read once. See the module docstring."""
    spec, name = _resolve(spec)
    entries = [_units(p, ("train",)) for p in _as_list(spec.path)]
    weights = _check_weights(spec.weights, len(entries), spec.path)
    eval_entries = [_units(p, _EVAL_SPLITS) for p in _as_list(spec.eval_path)]
    formats = {u.name: _format(u, spec) for entry in entries + eval_entries for u in entry}
    kinds = {format_kind(f): s for s, f in formats.items()}
    if len(kinds) > 1:  # each kind trains a different objective: a mix is a wrong path, not a dataset
        a, b = [k for k in KINDS if k in kinds][:2]
        raise ValueError(f"cannot mix {a} and {b} rows: {kinds[a]} is {a}, {kinds[b]} is {b}")
    fm = dict(spec.field_map or {})
    cache = None if spec.streaming else {
        u.name: list(_canonical(u, formats[u.name], fm, False)) for entry in entries + eval_entries for u in entry}
    build = lambda name, entries, weights, keep, need: _build(  # noqa: E731
        name, entries, formats, fm, cache, weights, seed, keep, need)
    fraction = spec.eval_fraction
    held = lambda row: _hash01(f"{seed}:{Path(row['source']).name}:{row['row']}") < fraction  # noqa: E731
    if fraction == 0:
        return build(name, entries, weights, None, "no rows"), (
            build(f"data.eval_path {_show(spec.eval_path)}", eval_entries, None, None, "no rows") if eval_entries else None)
    train = build(name, entries, weights, lambda row: not held(row),
                  f"every row was held out by data.eval_fraction={fraction}; none is left for training")
    return train, build(f"{name} (held out by eval_fraction={fraction})", entries, None, held, None)


def _resolve(spec: Any) -> tuple[Any, str]:
    """Check the DataSpec's fields; put the bundled data in place of `path: null`. (spec, name)."""
    if spec.format not in FORMATS + ("auto",):
        raise ValueError(f"data.format {spec.format!r} is unknown; expected one of {', '.join(FORMATS)}, auto")
    check_field_map(dict(spec.field_map or {}))
    if not 0.0 <= spec.eval_fraction < 1.0:
        raise ValueError(f"data.eval_fraction must be in [0, 1), got {spec.eval_fraction}")
    if spec.eval_path is not None and spec.eval_fraction > 0:
        raise ValueError("give data.eval_path or data.eval_fraction, not both")
    if spec.path is not None:
        return spec, f"data.path {_show(spec.path)}"
    if spec.weights is not None or spec.format == "auto":
        raise ValueError("data.weights and data.format=auto need data.path (the bundled data is one file of one format)")
    kind = format_kind(spec.format)
    path, held, fmt = {"text": (bundled_corpus_path(), None, "text"),
                       "chat": (bundled_chat_path(), bundled_chat_path("eval"), "messages"),
                       "preference": (bundled_pairs_path(), bundled_pairs_path("eval"), "preference"),
                       "prompt": (bundled_prompts_path(), bundled_prompts_path("eval"), "prompt_only"),
                       "unpaired": (bundled_unpaired_path(), bundled_unpaired_path("eval"), "unpaired")}[kind]
    eval_path = held if spec.eval_path is None and spec.eval_fraction == 0 else spec.eval_path
    spec = replace(spec, path=str(path), format=fmt, field_map={}, eval_path=eval_path)
    return spec, f"bundled {path.name}"


def _build(name: str, entries: list[list[_Unit]], formats: dict[str, str], fm: dict[str, str],
           cache: Optional[dict[str, list[dict]]], weights: Optional[list[float]], seed: int,
           keep: Optional[Callable[[dict], bool]], need: Optional[str]) -> RowSource:
    """A RowSource over `entries` (rows from `cache`, or read lazily when it is None); `keep` filters
    rows; `need` is the error for a file that keeps no row (None: only the whole split must keep one)."""
    def read(entry: list[_Unit]) -> Iterator[dict]:
        for u in entry:
            yield from _kept(iter(cache[u.name]) if cache is not None else _canonical(u, formats[u.name], fm, True),
                             u, keep, need)

    sources = [u.name for entry in entries for u in entry]
    formats = {s: formats[s] for s in sources}
    if cache is None:
        makers = [lambda e=entry: read(e) for entry in entries]
        return RowSource(name, sources, formats, stream=lambda: _nonempty(_mix_stream(makers, weights, seed), name))
    groups = [list(read(entry)) for entry in entries]
    if not any(groups):
        raise ValueError(f"{name}: no rows; raise data.eval_fraction or set data.eval_path")
    rows = _mix(groups, weights, seed) if weights else [row for group in groups for row in group]
    available, drawn = Counter(r["source"] for g in groups for r in g), Counter(r["source"] for r in rows)
    return RowSource(name, sources, formats, rows, {s: available[s] for s in sources}, {s: drawn[s] for s in sources})


def _canonical(unit: _Unit, fmt: str, fm: dict[str, str], streaming: bool) -> Iterator[dict[str, Any]]:
    """Every row of `unit`, checked and canonical, with its "source" and "row"."""
    for row_no, where, raw in _raw(unit, streaming):
        yield {**to_canonical(raw, fmt, {} if unit.kind == "txt" else fm, where), "source": unit.name, "row": row_no}


def _kept(rows: Iterator[dict], unit: _Unit, keep: Optional[Callable[[dict], bool]], need: Optional[str]) -> Iterator[dict]:
    seen = kept = 0
    for row in rows:
        seen += 1
        if keep is None or keep(row):
            kept += 1
            yield row
    if kept == 0 and need is not None:
        raise ValueError(f"{unit.name}: {'no rows (an empty file or dataset)' if seen == 0 else need}")


def _raw(unit: _Unit, streaming: bool) -> Iterator[tuple[int, str, Any]]:
    """(row number, where, row as read) for every row of `unit`."""
    if unit.kind in ("jsonl", "json"):
        yield from (_json_array(unit.path) if unit.kind == "json" and _starts_with(unit.path, b"[") else _jsonl(unit.path))
    elif unit.kind == "txt":
        docs = enumerate(read_txt(unit.path), start=1)
        yield from ((i, f"{unit.name} document {i}", {"text": doc}) for i, doc in docs)
    else:
        import datasets  # imported here: loading the package should not pay for it

        if unit.kind == "disk":
            check_saved_names(unit.path)
        try:
            if unit.kind == "disk":
                ds = datasets.load_from_disk(unit.name)
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[_pick_split(unit, list(ds))]
                ds = ds.to_iterable_dataset() if streaming else ds
            else:
                ds = datasets.load_dataset(unit.kind, data_files=unit.name, split="train", streaming=streaming)
            for i, row in enumerate(ds, start=1):
                yield i, f"{unit.name} row {i}", row
        except (datasets.exceptions.DatasetsError, ValueError, OSError) as err:  # ArrowInvalid is a ValueError
            cause = err
            while cause.__cause__ is not None:  # datasets wraps the parser's error, which says what is wrong
                cause = cause.__cause__
            raise ValueError(f"{unit.name}: cannot read it as {unit.kind} data ({type(cause).__name__}: {cause})") from err


def _jsonl(path: Path) -> Iterator[tuple[int, str, Any]]:
    hint = " (a .json file holds a list of rows, or one JSON object per line)" if path.suffix.lower() == ".json" else ""
    with path.open("rb") as handle:
        for line_no, data in enumerate(handle, start=1):
            where = f"{path} line {line_no}"
            try:
                line = data.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start})") from None
            if not line.strip():
                continue  # blank lines hold no row (a trailing newline, spacing)
            try:
                yield line_no, where, json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: malformed JSON ({err.msg} at column {err.colno}){hint}") from None
            except RecursionError:  # a row from anyone: deep nesting is a bad row, not a crash
                raise ValueError(f"{where}: malformed JSON (nested too deeply to read)") from None


def _json_array(path: Path) -> Iterator[tuple[int, str, Any]]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} line {err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except RecursionError:
        raise ValueError(f"{path}: malformed JSON (nested too deeply to read)") from None
    yield from ((i, f"{path} row {i}", row) for i, row in enumerate(rows, start=1))


def _starts_with(path: Path, prefix: bytes) -> bool:
    with path.open("rb") as handle:
        return handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(prefix)


def _units(path: Any, splits: tuple[str, ...]) -> list[_Unit]:
    """The readable units of one `path` entry: the file, the saved dataset, or a folder's files."""
    path = Path(os.fspath(path))
    if not path.exists():
        raise FileNotFoundError(f"data file or folder {str(path)!r} does not exist")
    if path.is_dir():
        if _is_saved(path):
            return [_Unit(path, "disk", splits)]
        units = []
        for root, dirs, files in os.walk(path):
            root_path = Path(root)
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            units += [_Unit(root_path / d, "disk", splits) for d in dirs if _is_saved(root_path / d)]
            dirs[:] = [d for d in dirs if not _is_saved(root_path / d)]
            units += [_Unit(root_path / f, SUFFIXES[Path(f).suffix.lower()], splits) for f in files
                      if Path(f).suffix.lower() in SUFFIXES and not f.startswith(".")]
        if not units:
            raise ValueError(f"{path}: folder holds no data files ({', '.join(SUFFIXES)}) and is not a dataset "
                             "written by save_to_disk")
        return sorted(units, key=lambda u: u.name)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: unsupported data file type {suffix or '(no extension)'!r}; supported: "
                         f"{', '.join(SUFFIXES)}, a folder of them, or a folder written by datasets' save_to_disk")
    return [_Unit(path, SUFFIXES[suffix], splits)]


def check_saved_names(folder: Path) -> None:
    """A saved dataset names its splits (dataset_dict.json) and Arrow files (each split's state.json) by path,
    and `datasets` joins those to the folder as they are: refuse (ValueError naming the file) a name that is
    absolute or climbs out with '..', so a folder from elsewhere reads nothing outside itself."""
    def inside(name: Any, where: Path, key: str) -> str:
        if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"{where}: {key} {name!r} is not a path inside {folder}; refusing to read it")
        return name

    splits = [""]
    if (folder / "dataset_dict.json").is_file():
        listed = read_json_object(folder / "dataset_dict.json").get("splits") or []
        splits = [inside(s, folder / "dataset_dict.json", "split") for s in listed]
    for split in splits:
        state_file = folder / split / "state.json"
        if state_file.is_file():
            for entry in read_json_object(state_file).get("_data_files") or []:
                inside(entry.get("filename") if isinstance(entry, dict) else entry, state_file, "data file")


def _is_saved(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or ((folder / "dataset_info.json").is_file()
                                                        and (folder / "state.json").is_file())


def _pick_split(unit: _Unit, available: list[str]) -> str:
    for split in unit.splits:
        if split in available:
            return split
    if len(available) == 1:
        return available[0]
    raise ValueError(f"{unit.name}: saved DatasetDict has splits {available}; expected one of {list(unit.splits)}")


def _format(unit: _Unit, spec: Any) -> str:
    """The format `unit` is read as: data.format, or for `auto` the first row's (read lazily)."""
    if unit.kind == "txt" and spec.format not in ("text", "auto"):
        raise ValueError(f"{unit.name}: a .txt file holds plain text documents, not data.format={spec.format} rows")
    if spec.format != "auto" or unit.kind == "txt":
        return "text" if unit.kind == "txt" else spec.format
    for _, where, raw in _raw(unit, streaming=True):
        return detect_format(raw, dict(spec.field_map or {}), where)
    raise ValueError(f"{unit.name}: no rows")


def _check_weights(weights: Optional[list[float]], n_entries: int, path: Any) -> Optional[list[float]]:
    if weights is None:
        return None
    weights = [float(w) for w in weights]
    if len(weights) != n_entries:
        raise ValueError(f"data.weights has {counted(len(weights), 'value')} for "
                         f"{counted(n_entries, 'entry', 'entries')} of data.path {path!r}")
    if any(not w >= 0 or w == float("inf") for w in weights) or sum(weights) <= 0:
        raise ValueError(f"data.weights must be finite, >= 0 and not all 0, got {weights}")
    return weights


def _mix(groups: list[list[dict]], weights: list[float], seed: int) -> list[dict]:
    total, rng = sum(len(g) for g in groups), random.Random(seed)
    rows: list[dict] = []
    for group, weight in zip(groups, weights):
        repeats, rest = divmod(round(weight / sum(weights) * total), len(group))
        picked = sorted(list(range(len(group))) * repeats + rng.sample(range(len(group)), rest))
        rows += [group[i] for i in picked]
    return rows


def _mix_stream(makers: list[Callable[[], Iterator[dict]]], weights: Optional[list[float]], seed: int) -> Iterator[dict]:
    if weights is None:
        yield from chain.from_iterable(make() for make in makers)
        return
    rng, active = random.Random(seed), [i for i, w in enumerate(weights) if w > 0]
    iters, done = {i: makers[i]() for i in active}, set()
    while True:
        i = rng.choices(active, weights=[weights[j] for j in active])[0]
        row = next(iters[i], None)
        if row is None:
            done.add(i)
            if len(done) == len(active):
                return
            iters[i] = makers[i]()
            row = next(iters[i])
        yield row


def _nonempty(rows: Iterator[dict], name: str) -> Iterator[dict]:
    count = 0
    for count, row in enumerate(rows, start=1):
        yield row
    if count == 0:
        raise ValueError(f"{name}: no rows; raise data.eval_fraction or set data.eval_path")


def _as_list(path: Any) -> list[Any]:
    return [] if path is None else list(path) if isinstance(path, (list, tuple)) else [path]


def _show(path: Any) -> str:
    return ", ".join(map(str, _as_list(path)))


def _hash01(key: str) -> float:
    """A uniform number in [0, 1) from `key`, the same on every machine and Python run."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2.0**64
