"""Count the activation memory autograd holds between forward and backward.

`SavedBytes` is a saved-tensor hook that records every distinct storage saved for backward
(parameters excluded, they live anyway). It is how the checkpointing tests compare policies and
how the benchmarks explain a peak-memory figure; wrap a forward (or a whole step) in it:

    with SavedBytes() as saved:
        loss = model(ids, labels=ids)
    loss.backward()
    print(saved.nbytes / 2**20, "MiB saved for backward")

Checkpointed regions save through their own inner hooks, so what they drop never reaches the
counter; what they keep (their inputs) does.
"""

from __future__ import annotations

import torch
from torch import nn


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            base = tensor._base if tensor._base is not None else tensor
            if not isinstance(base, nn.Parameter):
                storage = tensor.untyped_storage()
                self.storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        super().__init__(pack, lambda tensor: tensor)

    def __enter__(self) -> "SavedBytes":
        super().__enter__()
        return self

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())
