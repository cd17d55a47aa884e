"""`Mistral` against `transformers.MistralForCausalLM`: logits, hidden states, loss and gradients.

Both models get the same order-one random weights (`load_state_dict(hf.state_dict())`, keys
identical) and run in fp32. Padded query rows are undefined (transformers' eager and sdpa
disagree there), so padded batches are compared on real tokens only.
"""

from __future__ import annotations

import pytest
import torch

LOGIT_TOL = 1e-5
GRAD_REL_TOL = 1e-5


def _configs(tiny):
    return {
        "mha": tiny(num_key_value_heads=4),
        "gqa_tied": tiny(num_key_value_heads=2, tie_word_embeddings=True),
        "mqa": tiny(num_key_value_heads=1),
        "head_dim_16": tiny(num_key_value_heads=2, head_dim=16),  # 4 heads x 16 != hidden 32
        "window_5": tiny(num_key_value_heads=2, sliding_window=5),
        "theta_1e6_window_5_tied": tiny(
            hidden_size=64, num_attention_heads=8, num_key_value_heads=2, vocab_size=256,
            rope_theta=1e6, sliding_window=5, tie_word_embeddings=True,
        ),
        "window_5_mqa_head_dim_12": tiny(num_key_value_heads=1, head_dim=12, sliding_window=5),
    }


CONFIG_NAMES = ["mha", "gqa_tied", "mqa", "head_dim_16", "window_5", "theta_1e6_window_5_tied", "window_5_mqa_head_dim_12"]
LENGTHS = [16, 11, 7]  # batch rows; 16 > every sliding window used here
PACKED = [[6, 10], [16], [4, 4, 8]]  # document lengths of each packed row (each sums to 16)


def _packed_positions(docs: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in docs])


def _inputs(case: str, vocab: int, random_ids, padded_batch):
    """(input_ids, attention_mask | None, position_ids | None, compare-mask (B, T))."""
    B, T = len(LENGTHS), max(LENGTHS)
    if case == "plain":
        ids = random_ids(B, T, vocab, seed=1)
        return ids, None, None, torch.ones(B, T, dtype=torch.bool)
    if case in ("right_pad", "left_pad", "left_pad_positions"):
        side = "right" if case == "right_pad" else "left"
        ids, mask = padded_batch(LENGTHS, vocab, pad_id=0, side=side, seed=2)
        positions = (mask.cumsum(-1) - 1).clamp(min=0) if case == "left_pad_positions" else None
        return ids, mask, positions, mask.bool()
    if case == "offset_positions":
        ids = random_ids(B, T, vocab, seed=3)
        positions = torch.arange(T)[None] + torch.tensor([[0], [7], [1000]])
        return ids, None, positions, torch.ones(B, T, dtype=torch.bool)
    if case == "packed":
        ids = random_ids(B, T, vocab, seed=4)
        return ids, None, _packed_positions(PACKED), torch.ones(B, T, dtype=torch.bool)
    raise ValueError(case)


CASES = ["plain", "right_pad", "left_pad", "left_pad_positions", "offset_positions", "packed"]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_logits_match_transformers(name, case, attn, tiny, hf_and_ours, random_ids, padded_batch, max_abs_diff):
    kwargs = _configs(tiny)[name]
    ours, hf = hf_and_ours(kwargs, attn=attn)
    ids, mask, positions, real = _inputs(case, kwargs["vocab_size"], random_ids, padded_batch)
    with torch.no_grad():
        # use_cache=False: transformers detects packed documents only without a cache.
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        got = ours(ids, attention_mask=mask, position_ids=positions)
    assert got.shape == expected.shape
    assert torch.isfinite(got[real]).all()
    diff = max_abs_diff(got, expected, real)
    assert diff <= LOGIT_TOL, f"{name}/{case}/{attn}: max |ours - transformers| = {diff:.3g} > {LOGIT_TOL}"


@pytest.mark.parametrize("name", ["window_5", "theta_1e6_window_5_tied", "gqa_tied"])
def test_hidden_states_match_transformers(name, tiny, hf_and_ours, padded_batch, max_abs_diff):
    kwargs = _configs(tiny)[name]
    ours, hf = hf_and_ours(kwargs)
    ids, mask = padded_batch(LENGTHS, kwargs["vocab_size"], pad_id=0, side="left", seed=5)
    with torch.no_grad():
        expected = hf.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        got = ours(ids, attention_mask=mask, return_hidden=True)
    diff = max_abs_diff(got, expected, mask)
    assert diff <= LOGIT_TOL, f"{name}: hidden states differ by {diff:.3g}"


@pytest.mark.parametrize("name", ["window_5", "gqa_tied"])
def test_packed_documents_are_independent(name, tiny, our_model, random_ids, max_abs_diff):
    """Each packed document's logits equal a forward of that document alone (ours only)."""
    kwargs = _configs(tiny)[name]
    model = our_model(kwargs).eval()
    ids = random_ids(len(PACKED), 16, kwargs["vocab_size"], seed=6)
    with torch.no_grad():
        packed = model(ids, position_ids=_packed_positions(PACKED))
        for row, docs in enumerate(PACKED):
            start = 0
            for n in docs:
                alone = model(ids[row : row + 1, start : start + n])[0]
                diff = max_abs_diff(packed[row, start : start + n], alone)
                assert diff <= LOGIT_TOL, f"row {row} document at {start}..{start + n}: differs by {diff:.3g}"
                start += n


def _labels(ids: torch.Tensor, mask: torch.Tensor | None, seed: int) -> torch.Tensor:
    """Labels = ids with ~30% of tokens (and all padding) set to -100."""
    gen = torch.Generator().manual_seed(seed)
    labels = ids.clone()
    labels[torch.rand(ids.shape, generator=gen) < 0.3] = -100
    if mask is not None:
        labels[mask == 0] = -100
    return labels


GRAD_CONFIG = dict(num_key_value_heads=2, sliding_window=5)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_loss_matches_transformers(tied, padded, tiny, hf_and_ours, random_ids, padded_batch):
    kwargs = tiny(**GRAD_CONFIG, tie_word_embeddings=tied)
    ours, hf = hf_and_ours(kwargs)
    if padded:
        ids, mask = padded_batch(LENGTHS, kwargs["vocab_size"], pad_id=0, side="right", seed=7)
    else:
        ids, mask = random_ids(3, 16, kwargs["vocab_size"], seed=7), None
    labels = _labels(ids, mask, seed=8)
    count = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        expected_sum = hf(
            input_ids=ids, attention_mask=mask, labels=labels, use_cache=False, num_items_in_batch=torch.tensor(1)
        ).loss
        got = ours(ids, attention_mask=mask, labels=labels)
        got_sum = ours(ids, attention_mask=mask, labels=labels, reduction="sum")
        got_small_chunks = ours(ids, attention_mask=mask, labels=labels, loss_chunk_size=5)
    assert got.ndim == 0
    assert abs(float(got) - float(expected)) <= 1e-6, f"mean loss {float(got)!r} vs transformers {float(expected)!r}"
    assert abs(float(got_small_chunks) - float(expected)) <= 1e-6, "loss changes with loss_chunk_size"
    assert abs(float(got_sum) - float(expected_sum)) <= 1e-6 * abs(float(expected_sum)), (
        f"summed loss {float(got_sum)!r} vs transformers {float(expected_sum)!r}"
    )
    assert abs(float(got_sum) / count - float(got)) <= 1e-6, "sum / label-token count != mean"


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} received no gradient"
        grads[name] = p.grad.detach().clone()
    return grads


def _assert_grads_close(got: dict, expected: dict, tol: float, what: str) -> None:
    assert got.keys() == expected.keys(), f"{what}: parameter sets differ: {got.keys() ^ expected.keys()}"
    for name, g in expected.items():
        scale = float(g.abs().max())
        assert scale > 0, f"{name}: reference gradient is all zeros"
        rel = float((got[name] - g).abs().max()) / scale
        assert rel <= tol, f"{what}: `{name}` gradient differs by {rel:.3g} (relative to its max |grad|) > {tol}"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("tied", [False, True])
def test_gradients_match_transformers(attn, tied, tiny, hf_and_ours, padded_batch):
    kwargs = tiny(**GRAD_CONFIG, tie_word_embeddings=tied)
    ours, hf = hf_and_ours(kwargs, attn=attn)
    ours.train(), hf.train()  # dropout is 0: train mode must not change the maths
    ids, mask = padded_batch(LENGTHS, kwargs["vocab_size"], pad_id=0, side="right", seed=9)
    labels = _labels(ids, mask, seed=10)
    hf(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
    ours(ids, attention_mask=mask, labels=labels).backward()
    _assert_grads_close(_grads(ours), _grads(hf), GRAD_REL_TOL, f"ours vs transformers ({attn}, tied={tied})")


def test_gradient_checkpointing_gives_same_gradients(tiny, our_model, padded_batch):
    kwargs = tiny(**GRAD_CONFIG)
    ids, mask = padded_batch(LENGTHS, kwargs["vocab_size"], pad_id=0, side="left", seed=11)
    labels = _labels(ids, mask, seed=12)
    results = {}
    for checkpointing in (False, True):
        model = our_model(kwargs, seed=3).train()
        model.set_gradient_checkpointing(checkpointing)
        calls = []
        for block in model.model.layers:
            # A pre-hook: checkpoint's recompute may stop before the block returns.
            block.register_forward_pre_hook(lambda *_: calls.append(1))
        loss = model(ids, attention_mask=mask, labels=labels)
        forward_calls = len(calls)
        loss.backward()
        recomputed = len(calls) - forward_calls
        results[checkpointing] = (loss.item(), _grads(model), recomputed)
    n_layers = kwargs["num_hidden_layers"]
    assert results[False][2] == 0, "blocks ran again in backward without checkpointing"
    assert results[True][2] == n_layers, f"with checkpointing each block should recompute once, got {results[True][2]}"
    assert results[True][0] == results[False][0]
    _assert_grads_close(results[True][1], results[False][1], 1e-6, "checkpointing on vs off")
