"""NEFTune: uniform noise on the input embeddings while training (Jain et al. 2023, "NEFTune:
Noisy Embeddings Improve Instruction Finetuning"), switched on by `data.neftune_alpha`.

Each embedding entry gets `U(-1, 1) * alpha / sqrt(L * H)`, H the hidden size and L the real
length of the sequence the token belongs to: the paper scales by the example's length, so
padding must not shrink the noise. L is the row's unpadded length for padded batches, the
document's length for packed rows (each example is noised as if alone), the row length for
text rows. Only in training mode: evaluation and generation see clean embeddings.

The noise comes from torch's global generator, so it is saved and restored with the other RNG
states and a resumed run draws the same noise.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.hooks import RemovableHandle

from mistral_train.model.attention import documents_from_positions
from mistral_train.train.steps import Batch, Objective


def sequence_lengths(batch: Batch) -> torch.Tensor:
    """(B, T) float: the real length of the sequence each token of `batch` belongs to."""
    ids = batch["input_ids"]
    B, T = ids.shape
    if "attention_mask" in batch:  # padded rows
        return batch["attention_mask"].sum(dim=1, keepdim=True).expand(B, T).float()
    positions = batch.get("position_ids")
    documents = documents_from_positions(positions) if positions is not None else None
    if documents is None:  # one sequence per row
        return torch.full((B, T), float(T), device=ids.device)
    counts = torch.zeros(B, T + 1, device=ids.device).scatter_add_(1, documents, torch.ones(B, T, device=ids.device))
    return counts.gather(1, documents)  # the size of each token's document


class NEFTune:
    """Adds the noise through a forward hook on `model.model.embed_tokens`.

    `wrap(objective)` returns an objective whose step first records the batch's sequence lengths
    for the hook; a training-mode forward without recorded lengths uses the padded row length.
    """

    def __init__(self, alpha: float) -> None:
        if not alpha > 0:
            raise ValueError(f"data.neftune_alpha must be > 0 (or null to turn NEFTune off), got {alpha}")
        self.alpha = float(alpha)
        self._lengths: Optional[torch.Tensor] = None

    def attach(self, model: torch.nn.Module) -> RemovableHandle:
        """Register the hook on the model's token embedding; `.remove()` the handle to detach."""
        return model.model.embed_tokens.register_forward_hook(self._hook)

    def wrap(self, objective: Objective) -> Objective:
        def step(model: torch.nn.Module, batch: Batch):
            self._lengths = sequence_lengths(batch)
            try:
                return objective.step(model, batch)
            finally:
                self._lengths = None

        return Objective(step, objective.count)

    def _hook(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> Optional[torch.Tensor]:
        if not module.training:
            return None
        B, T, H = output.shape  # (B, T, H) embeddings
        lengths = self._lengths
        if lengths is None or lengths.shape != (B, T):
            lengths = torch.full((B, T), float(T), device=output.device)
        scale = self.alpha / torch.sqrt(lengths.to(output.device) * H)  # (B, T)
        noise = torch.empty_like(output).uniform_(-1.0, 1.0)
        return output + noise * scale.unsqueeze(-1).to(output.dtype)
