"""Reference log-probs computed once, cached on disk, and reused (`trainer.dpo.precompute_reference`).

Before step 1 the reference policy scores every training and held-out pair; the table
(source, row) -> [chosen, rejected] then rides in the batches (data/pair_batches.attach_reference swaps
the data's collate function for one that adds it),
and the run holds no reference model (or adapter copy) at all while training.

The cache file is named by a hash of everything the numbers depend on: the reference weights (the
model folder's config and weight files by name, size and modification time; the starting adapter's
bytes when it is the reference; a fresh model's shape and seed), how they are loaded (dtype,
quantization, precision), the reference kind, and the tokenized pairs themselves with the batching
(padding or packing). A later run of the same model on the same data finds the file and computes
nothing; any change gives another name. Files are written to a temp name and renamed into place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mistral_train.config import RunConfig
from mistral_train.data.epochs import TrainData
from mistral_train.data.pair_batches import PairKey, pair_key
from mistral_train.data.preference import PreferencePair


def _folder_fingerprint(folder: Path, digest: "hashlib._Hash", content: bool) -> None:
    """Feed a folder's files into `digest`: their bytes (`content`, small adapter folders) or their
    name, size and modification time (model folders of many GB)."""
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")):
        if content:
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        else:
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())


def cache_key(cfg: RunConfig, reference_kind: str, pairs: list[PreferencePair]) -> str:
    """The hex name of the cache file for this run's reference log-probs (see the module docstring)."""
    digest = hashlib.sha256()
    settings = {"kind": reference_kind, "model": dataclasses.asdict(cfg.model), "seed": cfg.trainer.seed,
                "precision": cfg.trainer.precision, "packing": cfg.data.packing, "max_seq_len": cfg.trainer.max_seq_len,
                "quantize": cfg.adapter.kind == "qlora"}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    if cfg.model.path:
        _folder_fingerprint(Path(cfg.model.path), digest, content=False)
    if reference_kind == "initial_adapter":
        _folder_fingerprint(Path(cfg.adapter.path), digest, content=True)
    for pair in pairs:
        digest.update(json.dumps([pair.source, pair.row, pair.prompt_ids, pair.chosen_ids, pair.rejected_ids]).encode())
    return digest.hexdigest()[:32]


def compute_table(model: torch.nn.Module, reference: Callable, pairs: list[PreferencePair], collate: Callable,
                  batch_size: int, device: torch.device, autocast: Callable) -> dict[PairKey, torch.Tensor]:
    """(source, row) -> (2,) [chosen, rejected] reference log-probs (fp32, CPU) of every pair."""
    table: dict[PairKey, torch.Tensor] = {}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk).items()}
        with autocast():
            logps = reference(model, batch).float().cpu()  # (2B,)
        B = len(chunk)
        for i, pair in enumerate(chunk):
            table[pair_key(pair)] = torch.stack([logps[i], logps[B + i]])
    return table


def load_or_compute(cfg: RunConfig, data: TrainData, reference_kind: str, model: torch.nn.Module, reference: Callable,
                    device: torch.device, autocast: Callable, main_process: bool = True,
                    wait: Callable[[], None] = lambda: None) -> tuple[dict[PairKey, torch.Tensor], Path, bool]:
    """The reference table of every training and held-out pair: read from the cache, or computed (on the main
    process) and written there. Returns (table, cache file, computed now)."""
    pairs = list(data.train.items) + list(data.eval_items or [])
    folder = Path(cfg.trainer.dpo.reference_cache or Path(cfg.run.dir) / "reference_cache")
    path = folder / f"{cache_key(cfg, reference_kind, pairs)}.safetensors"
    computed = False
    if main_process and not path.is_file():
        table = compute_table(model, reference, pairs, data.train.collate, cfg.trainer.batch_size, device, autocast)
        _write(path, table)
        computed = True
    wait()  # the other processes read what the main one wrote
    return _read(path), path, computed


def _write(path: Path, table: dict[PairKey, torch.Tensor]) -> None:
    keys = sorted(table)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({"logps": torch.stack([table[k] for k in keys])}, str(tmp), metadata={"keys": json.dumps(keys)})
    os.replace(tmp, path)


def _read(path: Path) -> dict[PairKey, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        keys = json.loads(f.metadata()["keys"])
        logps = f.get_tensor("logps")  # (N, 2)
    return {(str(source), int(row)): logps[i] for i, (source, row) in enumerate(keys)}
