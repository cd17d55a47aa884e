"""Cross-entropy of a linear head without the full logits tensor.

The LM head and the loss run chunk by chunk over label tokens; each chunk's gradient with
respect to the hidden states and the head weight is produced in the forward pass, so
neither the (N, V) logits nor their gradient ever exist for the whole batch. Tokens whose
label is ignored are dropped before the head, so they cost nothing.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `labels` (no ignored labels here)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int) -> torch.Tensor:
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]  # (n, H)
            y = labels[start : start + chunk_size]  # (n,)
            logits = (h @ weight.T).float()  # (n, V): the only vocab-sized tensor, one chunk at a time
            log_norm = torch.logsumexp(logits, dim=-1)
            total += (log_norm - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if want_hidden or want_weight:
                # d(loss)/d(logits) = softmax - onehot, computed in place over the logits buffer.
                grad_logits = logits.sub_(log_norm[:, None]).exp_()
                grad_logits[torch.arange(y.shape[0], device=y.device), y] -= 1.0
                grad_logits = grad_logits.to(hidden.dtype)
                if want_hidden:
                    grad_hidden[start : start + chunk_size] = grad_logits @ weight
                if want_weight:
                    grad_weight += (grad_logits.T @ h).float()
        ctx.weight_dtype = weight.dtype  # grad_weight is accumulated in fp32, returned in the weight's dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of the logits `hidden @ weight.T`, computed chunk by chunk.

    Args:
        hidden: (N, H) or (B, T, H) final hidden states, already aligned with `labels`.
        weight: (V, H) the output head.
        labels: (N,) or (B, T) target ids; IGNORE_INDEX (-100) marks tokens without a label.
        chunk_size: tokens per chunk; bounds the (chunk, V) buffer.
        reduction: "sum" or "mean" (over label tokens; 0 when there are none).
    Returns:
        Scalar fp32 loss.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    hidden, labels = hidden[keep], labels[keep]  # only label tokens reach the head
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= weight.shape[0]):
        raise ValueError(f"labels must be in [0, {weight.shape[0]}) or {IGNORE_INDEX}")
    total = _LinearCrossEntropy.apply(hidden, weight, labels, chunk_size)
    if reduction == "sum":
        return total
    return total / max(labels.numel(), 1)
