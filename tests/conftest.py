"""Shared fixtures: tiny Mistral configs, seeded transformers twins, quiet offline transformers.

Tests that compare against transformers build both models from one dict of keyword
arguments (transformers' `MistralConfig` names, which are ours too) and copy the weights
with `load_state_dict`, so any difference comes from the model code, never the weights.
"""

from __future__ import annotations

import os

# tests/serving needs vLLM, which lives in its own venv (.venv-vllm, scripts/setup_vllm.sh);
# scripts/test.sh runs that folder there, so the main venv never collects it.
# tests/cuda needs a GPU: scripts/gpu_check.sh runs it by name on a CUDA machine (a path given on the command
# line is still collected); tests/scripts/test_gpu_check.py checks here that it imports and collects.
collect_ignore = ["serving", "cuda"]

# No test may reach the Hugging Face Hub; set before transformers is imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch

# Every model in the suite is tiny: one intra-op thread is faster than two (thread hand-off
# costs more than the maths), and `pytest -n 2` workers then do not fight over the cores.
torch.set_num_threads(1)

# Markers by place (registered in pyproject.toml). The fast subset is
# `scripts/test.sh -m "not e2e and not distributed"` (README, docs/architecture.md). e2e: files whose tests
# train whole runs (recipes, fit() over the bundled data, subprocesses killed and resumed), chosen by
# measured time (pytest --durations).
MARKED = {
    "oracle": ("oracle/",),
    "distributed": ("distributed/",),
    "e2e": ("test_recipes.py", "train/test_resume_kill.py", "train/test_adapter_runs.py",
            "train/test_preference_runs.py", "train/test_loop.py", "train/test_objectives.py",
            "train/test_grpo_runs.py"),
}
_TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        where = item.path.resolve().relative_to(_TESTS).as_posix()
        for marker, places in MARKED.items():
            if any(where == place or (place.endswith("/") and where.startswith(place)) for place in places):
                item.add_marker(marker)


TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    sliding_window=None,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    attention_dropout=0.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=512,
)


def tiny_kwargs(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments of a tiny Mistral (valid for both our and transformers' MistralConfig)."""
    return {**TINY, **overrides}


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter a seeded random value of order one.

    The default init (std 0.02, norms at 1) gives near-zero logits, where a wrong norm
    weight or a swapped projection could hide below the tolerance; this makes each
    parameter matter. Tied weights are visited once (named_parameters de-duplicates).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif "embed_tokens" in name:
                p.copy_(0.25 * noise)  # also the tied output head: keeps logits O(1)
            else:
                fan_in = p.shape[-1]
                p.copy_(noise * (1.0 / fan_in) ** 0.5)
    return model


def hf_class(task: str):
    import transformers

    return {
        "causal_lm": transformers.MistralForCausalLM,
        "sequence_classification": transformers.MistralForSequenceClassification,
        "token_classification": transformers.MistralForTokenClassification,
    }[task]


def make_hf(kwargs: dict[str, Any], task: str = "causal_lm", attn: str = "sdpa", seed: int = 0):
    """A seeded transformers Mistral in eval mode with order-one random weights."""
    import transformers

    config = transformers.MistralConfig(**kwargs)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = hf_class(task)(config)
    if model.config._attn_implementation != attn:
        raise AssertionError(f"transformers picked {model.config._attn_implementation!r}, asked for {attn!r}")
    return randomize_(model, seed).eval()


def make_ours(kwargs: dict[str, Any], task: str = "causal_lm"):
    from mistral_train import Mistral, MistralConfig

    return Mistral(MistralConfig(**kwargs), task=task).eval()


def make_pair(kwargs: dict[str, Any], task: str = "causal_lm", attn: str = "sdpa", seed: int = 0):
    """(ours, hf): the same weights in both, both in eval mode."""
    hf = make_hf(kwargs, task, attn, seed)
    ours = make_ours(kwargs, task)
    ours.load_state_dict(hf.state_dict())  # strict: the key sets must be identical
    return ours, hf


@pytest.fixture
def tiny() -> Callable[..., dict[str, Any]]:
    """Factory: tiny(**overrides) -> config kwargs."""
    return tiny_kwargs


@pytest.fixture
def hf_and_ours() -> Callable[..., tuple]:
    """Factory: hf_and_ours(kwargs, task="causal_lm", attn="sdpa", seed=0) -> (ours, hf)."""
    return make_pair


@pytest.fixture
def hf_model() -> Callable[..., Any]:
    """Factory: hf_model(kwargs, task="causal_lm", attn="sdpa", seed=0) -> seeded transformers model."""
    return make_hf


@pytest.fixture
def our_model() -> Callable[..., Any]:
    """Factory: our_model(kwargs, task="causal_lm", seed=0) -> seeded `Mistral` with random weights."""

    def build(kwargs: dict[str, Any], task: str = "causal_lm", seed: int = 0):
        torch.manual_seed(seed)
        return randomize_(make_ours(kwargs, task), seed)

    return build


@pytest.fixture
def random_ids() -> Callable[..., torch.Tensor]:
    """Factory: random_ids(batch, length, vocab, seed=0, low=3) -> (B, T) ids avoiding special ids < low."""

    def build(batch: int, length: int, vocab: int, seed: int = 0, low: int = 3) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(low, vocab, (batch, length), generator=gen)

    return build


@pytest.fixture(autouse=True, scope="session")
def _quiet_transformers() -> None:
    try:
        import transformers
    except ImportError:  # suites that never touch transformers still run
        return
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def pad_batch(rows: list[torch.Tensor], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad 1-D id rows to one length on `side` ("left" | "right"); returns (ids, attention_mask)."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        if side == "left":
            ids[i, length - len(r) :], mask[i, length - len(r) :] = r, 1
        else:
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return ids, mask


@pytest.fixture
def padded_batch() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """Factory: padded_batch(lengths, vocab, pad_id, side, seed=0) -> (ids, attention_mask)."""

    def build(lengths: list[int], vocab: int, pad_id: int, side: str, seed: int = 0, low: int = 3):
        gen = torch.Generator().manual_seed(seed)
        rows = [torch.randint(low, vocab, (n,), generator=gen) for n in lengths]
        return pad_batch(rows, pad_id, side)

    return build


def max_abs(a: torch.Tensor, b: torch.Tensor, where: Optional[torch.Tensor] = None) -> float:
    """max |a - b| over the positions where `where` (leading dims of a) is true."""
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    diff = (a.float() - b.float()).abs()
    if where is not None:
        diff = diff[where.bool()]
    return float(diff.max()) if diff.numel() else 0.0


@pytest.fixture
def max_abs_diff() -> Callable[..., float]:
    """Function: max_abs_diff(a, b, where=None) -> max |a - b| over positions where `where` is true."""
    return max_abs


@pytest.fixture(scope="session")
def tiny_base_folder(tmp_path_factory):
    """A tiny random Mistral HF folder with the real v1 tokenizer: the 'pretrained' base of adapter runs.
    initializer_range 0.1 makes output rows long enough for an adapter to move the loss in a few steps."""
    from tests._tiny import save_tiny_folder
    from tests._tokenizers import bundled

    return save_tiny_folder(tmp_path_factory.mktemp("tiny_base"), seed=0, tokenizer="v1",
                            vocab_size=bundled("v1").vocab_size, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=None,
                            tie_word_embeddings=True, initializer_range=0.1)
