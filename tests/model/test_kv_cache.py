"""KV-cached generation: every decoded step equals a full forward; the rolling buffer stays window-sized."""

from __future__ import annotations

import pytest
import torch

from mistral_train.generate import generate
from mistral_train.model.kv_cache import KVCache

TOL = 1e-5
WINDOW = 4


def _kwargs(tiny, window):
    # eos None: generation runs its full length, so lengths never depend on the random weights.
    return tiny(sliding_window=window, eos_token_id=None, num_key_value_heads=2)


def _full_forward_last(model, ids, mask=None):
    """Logits of the last position from one uncached forward (positions count real tokens only)."""
    positions = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=positions)[:, -1]


@pytest.mark.parametrize(
    "window,prompt,new",
    [(None, 5, 8), (WINDOW, 3, 3 * WINDOW), (WINDOW, 7, 3 * WINDOW), (WINDOW, 2 * WINDOW, 2)],
    ids=["no_window", "window_prompt_shorter", "window_prompt_longer", "window_prompt_2x"],
)
def test_every_step_equals_full_forward(window, prompt, new, tiny, our_model, random_ids, max_abs_diff):
    model = our_model(_kwargs(tiny, window)).eval()
    ids = random_ids(2, prompt, 128, seed=1)
    out, step_logits = generate(model, ids, new, return_logits=True)
    assert out.shape == (2, prompt + new) and len(step_logits) == new
    assert torch.equal(out[:, :prompt], ids)
    for i, logits in enumerate(step_logits):
        expected = _full_forward_last(model, out[:, : prompt + i])
        diff = max_abs_diff(logits, expected)
        assert diff <= TOL, f"step {i} (sequence length {prompt + i}): cached logits differ by {diff:.3g}"
        assert torch.equal(out[:, prompt + i], logits.argmax(-1)), f"step {i}: greedy token is not the argmax"


def test_left_padded_steps_equal_full_forward(tiny, our_model, padded_batch, max_abs_diff):
    model = our_model(_kwargs(tiny, WINDOW)).eval()
    ids, mask = padded_batch([6, 2, 4], 128, pad_id=0, side="left", seed=2)
    new = 3 * WINDOW
    out, step_logits = generate(model, ids, new, attention_mask=mask, return_logits=True)
    full_mask = torch.cat([mask, torch.ones(3, new, dtype=mask.dtype)], dim=1)
    for i, logits in enumerate(step_logits):
        T = ids.shape[1] + i
        diff = max_abs_diff(logits, _full_forward_last(model, out[:, :T], full_mask[:, :T]))
        assert diff <= TOL, f"step {i}: cached logits of a left-padded batch differ by {diff:.3g}"


def _capture_caches(monkeypatch) -> list:
    caches = []
    real = KVCache.for_model.__func__

    def for_model(cls, *args, **kwargs):
        cache = real(cls, *args, **kwargs)
        caches.append(cache)
        return cache

    monkeypatch.setattr(KVCache, "for_model", classmethod(for_model))
    return caches


def _nbytes(cache: KVCache) -> int:
    return sum(b.numel() * b.element_size() for b in cache.buffers())


def test_rolling_cache_memory_is_constant(tiny, our_model, random_ids, monkeypatch):
    kwargs = _kwargs(tiny, WINDOW)
    model = our_model(kwargs).eval()
    caches = _capture_caches(monkeypatch)
    ids = random_ids(2, 3, 128, seed=3)
    for new in (2 * WINDOW, 3 * WINDOW, 10 * WINDOW):
        assert generate(model, ids, new).shape == (2, 3 + new)
    assert len(caches) == 3, "generate did not build its cache with KVCache.for_model"
    sizes = [_nbytes(c) for c in caches]
    assert sizes[0] == sizes[1] == sizes[2], f"cache bytes grow with generation length: {sizes}"
    head_dim = kwargs["hidden_size"] // kwargs["num_attention_heads"]
    for cache in caches:  # (layers, B, kv heads, slots, head_dim): window-many slots
        expected = (kwargs["num_hidden_layers"], 2, kwargs["num_key_value_heads"], WINDOW, head_dim)
        assert tuple(cache.k.shape) == tuple(cache.v.shape) == expected, f"cache k {tuple(cache.k.shape)}"


def test_cache_without_window_holds_the_whole_sequence(tiny, our_model, random_ids, monkeypatch):
    model = our_model(_kwargs(tiny, None)).eval()
    caches = _capture_caches(monkeypatch)
    generate(model, random_ids(1, 3, 128, seed=4), 9)
    assert caches[0].k.shape[-2] >= 12


@pytest.mark.parametrize("window", [None, WINDOW])
def test_batched_left_padding_equals_rows_alone(window, tiny, our_model, padded_batch, max_abs_diff):
    model = our_model(_kwargs(tiny, window)).eval()
    lengths = [7, 3, 5, 1]
    ids, mask = padded_batch(lengths, 128, pad_id=0, side="left", seed=5)
    new = 3 * WINDOW
    out, step_logits = generate(model, ids, new, attention_mask=mask, return_logits=True)
    T = ids.shape[1]
    for row, n in enumerate(lengths):
        alone, alone_logits = generate(model, ids[row : row + 1, T - n :], new, return_logits=True)
        assert torch.equal(out[row, T:], alone[0, n:]), f"row {row}: tokens differ from generating it alone"
        for i in range(new):
            diff = max_abs_diff(step_logits[i][row], alone_logits[i][0])
            assert diff <= TOL, f"row {row}, step {i}: logits differ by {diff:.3g}"


@pytest.mark.parametrize("window", [None, WINDOW])
@pytest.mark.parametrize("padded", [False, True])
def test_greedy_equals_transformers_generate(window, padded, tiny, hf_and_ours, padded_batch, random_ids):
    ours, hf = hf_and_ours(_kwargs(tiny, window))
    if padded:
        ids, mask = padded_batch([6, 2, 4], 128, pad_id=0, side="left", seed=6)
    else:
        ids, mask = random_ids(2, 6, 128, seed=6), None
    new = 3 * WINDOW + 1
    got = generate(ours, ids, new, attention_mask=mask)
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected), f"ours\n{got}\ntransformers\n{expected}"


def test_stops_at_eos_and_pads_finished_rows(tiny, our_model, random_ids):
    model = our_model(_kwargs(tiny, None)).eval()
    ids = random_ids(3, 4, 128, seed=7)
    free = generate(model, ids, 10)  # no EOS configured: full length
    eos = int(free[0, 4 + 2])  # row 0 emits it by step 2 at the latest
    stops = []  # tokens each row generates up to and including its first EOS
    for row in range(3):
        generated = free[row, 4:].tolist()
        stops.append(generated.index(eos) + 1 if eos in generated else 10)
    out = generate(model, ids, 10, eos_token_id=eos)
    assert out.shape[1] == 4 + max(stops), f"rows stop after {stops} tokens, output has {out.shape[1] - 4}"
    for row, stop in enumerate(stops):
        assert torch.equal(out[row, : 4 + stop], free[row, : 4 + stop]), f"row {row} changed before its EOS"
        assert (out[row, 4 + stop :] == eos).all(), f"row {row}: after EOS a row is padded (pad defaults to EOS)"


def test_seeded_sampling_is_reproducible(tiny, our_model, random_ids):
    model = our_model(_kwargs(tiny, WINDOW)).eval()
    ids = random_ids(2, 4, 128, seed=8)

    def sample(seed, **kw):
        return generate(model, ids, 12, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)

    first = sample(0)
    torch.manual_seed(123)  # the global RNG must not matter
    assert torch.equal(sample(0), first)
    assert not torch.equal(sample(1), first), "different seeds gave identical samples"
    assert torch.equal(sample(0, top_k=20, top_p=0.9), sample(0, top_k=20, top_p=0.9))


def test_top_k_1_and_tiny_top_p_equal_greedy(tiny, our_model, random_ids):
    model = our_model(_kwargs(tiny, WINDOW)).eval()
    ids = random_ids(2, 4, 128, seed=9)
    greedy = generate(model, ids, 10)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(generate(model, ids, 10, temperature=1.3, top_k=1, generator=gen), greedy)
    assert torch.equal(generate(model, ids, 10, temperature=1.3, top_p=1e-6, generator=gen), greedy)


def test_generate_refuses_to_pass_max_position_embeddings():
    from mistral_train import Mistral, MistralConfig
    from mistral_train.generate import generate

    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    model = Mistral(config)
    assert generate(model, list(range(1, 9)), max_new_tokens=8, stop_at_eos=False).shape == (1, 16)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, list(range(1, 9)), max_new_tokens=9)
