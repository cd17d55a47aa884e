"""`generate(..., compile=True)`: the compiled one-token step over a static cache emits the
greedy tokens of the eager path (logits within 1e-5), with a rolling window shorter than the
generation and with left-padded batches, and later calls reuse the compiled step."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from mistral_train.generate import generate
from mistral_train.model.kv_cache import KVCache

TOL = 1e-5
WINDOW = 4


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/model/conftest.py


def _model(tiny, our_model, window):
    # eos None: every call runs its full length, whatever the random weights emit.
    return our_model(tiny(num_key_value_heads=2, sliding_window=window, eos_token_id=None), seed=1).eval()


def _assert_same(got, expected, what: str) -> None:
    (ids, logits), (ref_ids, ref_logits) = got, expected
    assert torch.equal(ids, ref_ids), f"{what}: compiled greedy tokens differ\n{ids}\nvs eager\n{ref_ids}"
    for step, (a, b) in enumerate(zip(logits, ref_logits)):
        diff = float((a - b).abs().max())
        assert diff <= TOL, f"{what}: step {step} logits differ by {diff:.3g}"


def test_rolling_window_with_left_padded_batch(tiny, our_model, padded_batch):
    """Window 4, 12 new tokens (3x the window: the buffer wraps), prompts of 6, 2 and 4 tokens."""
    model = _model(tiny, our_model, WINDOW)
    ids, mask = padded_batch([6, 2, 4], 128, pad_id=0, side="left", seed=2)
    expected = generate(model, ids, 3 * WINDOW, attention_mask=mask, return_logits=True)
    got = generate(model, ids, 3 * WINDOW, attention_mask=mask, return_logits=True, compile=True)
    _assert_same(got, expected, "rolling, left-padded")
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 1, f"the decode step compiled {graphs} graphs; one serves every step"
    # Another prompt, another length: the rolling cache keeps its shape, so nothing recompiles.
    ids2, mask2 = padded_batch([3, 5, 1], 128, pad_id=0, side="left", seed=3)
    _assert_same(generate(model, ids2, 20, attention_mask=mask2, return_logits=True, compile=True),
                 generate(model, ids2, 20, attention_mask=mask2, return_logits=True), "second call")
    assert counters["stats"]["unique_graphs"] == 1, "a second call with the same shapes recompiled"


def test_full_cache_without_window(tiny, our_model, random_ids):
    """No window: a static cache of prompt + new tokens, attended over all slots (empty ones masked)."""
    model = _model(tiny, our_model, None)
    ids = random_ids(2, 5, 128, seed=4)
    _assert_same(generate(model, ids, 10, return_logits=True, compile=True),
                 generate(model, ids, 10, return_logits=True), "no window")


def test_static_cache_step_equals_the_ordinary_step(tiny, our_model, random_ids, max_abs_diff):
    """Eagerly, without compile: a static cache's single-token path gives the logits of the
    ordinary path, in both cache kinds, so compile=True changes only the execution."""
    for window in (None, WINDOW):
        model = _model(tiny, our_model, window)
        ids = random_ids(2, 6, 128, seed=5)
        logits = {}
        for static in (False, True):
            cache = KVCache.for_model(model.config, 2, 6, torch.float32, "cpu", static=static)
            with torch.no_grad():
                steps = [model(ids[:, i : i + 1], cache=cache, cache_index=torch.tensor([i]))[:, -1] for i in range(6)]
            logits[static] = torch.stack(steps)
        assert max_abs_diff(logits[True], logits[False]) <= TOL, f"window {window}"


def test_mixture_of_experts_decodes_compiled_in_fp32():
    """A Mixtral's experts under compile: torch._grouped_mm's compiled CPU kernel rejects fp32, so compiled
    decoding takes the per-expert path there and emits the eager tokens (logits within 1e-5)."""
    from mistral_train.model.config import MistralConfig
    from mistral_train.model.mistral import Mistral

    config = MistralConfig.from_hf_dict({
        "model_type": "mixtral", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
        "eos_token_id": None})
    torch.manual_seed(0)
    model = Mistral(config).eval()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(5))
    _assert_same(generate(model, ids, 6, return_logits=True, compile=True),
                 generate(model, ids, 6, return_logits=True), "mixtral")
