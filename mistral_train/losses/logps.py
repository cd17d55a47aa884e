"""Per-sequence log-probabilities of labelled tokens, without the full logits tensor.

DPO and its relatives need log p(completion | prompt) summed per sequence, and each sequence's
sum gets its own weight in the backward pass (the loss is a non-linear function of the sums).
So unlike the fused cross-entropy of ce.py, the gradient cannot be formed in the forward pass:
the forward computes each token's log-prob chunk by chunk and keeps only the (N,) results; the
backward recomputes each chunk's logits and scales softmax - onehot by that chunk's upstream
gradients. At no point does a (N, V) tensor exist for more than `chunk_size` tokens; the price
is one extra head matmul per chunk in the backward.
"""

from __future__ import annotations

import torch

from mistral_train.losses.ce import IGNORE_INDEX


class _LinearTokenLogProbs(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[label] per token, for (N, H) hidden and (N,) labels."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int) -> torch.Tensor:
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            logits = (hidden[start : start + chunk_size] @ weight.T).float()  # (n, V): one chunk at a time
            y = labels[start : start + chunk_size]
            out[start : start + chunk_size] = logits.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(logits, -1)
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, labels = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        step = ctx.chunk_size
        for start in range(0, hidden.shape[0], step):
            h, y, g = hidden[start : start + step], labels[start : start + step], grad_out[start : start + step]
            logits = (h @ weight.T).float()
            # d logp[y] / d logits = onehot(y) - softmax; scaled per token by its upstream gradient
            grad_logits = torch.softmax(logits, dim=-1).mul_(-g[:, None])
            grad_logits[torch.arange(y.shape[0], device=y.device), y] += g
            grad_logits = grad_logits.to(hidden.dtype)
            if want_hidden:
                grad_hidden[start : start + step] = grad_logits @ weight
            if want_weight:
                grad_weight += (grad_logits.T @ h).float()
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   sequence_index: torch.Tensor | None = None, num_sequences: int | None = None,
                   chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the labelled tokens of each sequence, and how many there are.

    Args:
        hidden: (B, T, H) final hidden states, aligned with `labels` (already shifted: the hidden
            state at t scores labels[t]).
        weight: (V, H) the output head.
        labels: (B, T) target ids, IGNORE_INDEX (-100) where nothing is scored.
        sequence_index: (B, T) which sequence each token belongs to (packed rows hold several;
            -1 on padding); None: row b is sequence b.
        num_sequences: how many sequences `sequence_index` numbers (default: its max + 1).
        chunk_size: tokens per chunk; bounds the (chunk, V) buffer.
    Returns:
        logps (S,) fp32 sums (differentiable) and counts (S,) int64 of labelled tokens.
    """
    if sequence_index is None:
        sequence_index = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)
    keep = labels != IGNORE_INDEX
    flat_hidden = hidden[keep]  # (N, H): only scored tokens reach the head
    flat_labels, owner = labels[keep], sequence_index[keep]
    if flat_labels.numel() and (int(flat_labels.min()) < 0 or int(flat_labels.max()) >= weight.shape[0]):
        raise ValueError(f"labels must be in [0, {weight.shape[0]}) or {IGNORE_INDEX}")
    if flat_labels.numel() and int(owner.min()) < 0:
        raise ValueError("a labelled token has sequence_index -1 (padding); labels on padding must be -100")
    n = num_sequences if num_sequences is not None else int(sequence_index.max()) + 1
    token_logps = _LinearTokenLogProbs.apply(flat_hidden, weight, flat_labels, chunk_size)
    logps = torch.zeros(n, dtype=torch.float32, device=hidden.device).index_add(0, owner, token_logps)
    counts = torch.zeros(n, dtype=torch.long, device=hidden.device).index_add(0, owner, torch.ones_like(owner))
    return logps, counts
