"""Rollout sampling against transformers (what trl's GRPOTrainer generates with):

- the distribution `generate.sample_next` draws from (`generate.processed_logits`) equals the one the
  processors transformers' generate builds for the same temperature/top_k/top_p give, exactly;
- seeded draws of `sample_next` follow those probabilities (chi-square, fixed seed);
- on a tiny model saved with transformers, `generate_completions` at temperature 0 over left-padded
  prompts equals transformers' greedy generate token for token, EOS stops included.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from mistral_train import Mistral
from mistral_train.config import GRPOSpec
from mistral_train.generate import processed_logits, sample_next
from mistral_train.rollout.sampling import completions_from_tokens, generate_completions
from tests.conftest import make_hf, pad_batch, tiny_kwargs

VOCAB = 64
# (temperature, top_k, top_p); top_k None / top_p 1.0: no cut (transformers: top_k=0, top_p=1.0)
CASES = {"temperature": (0.7, None, 1.0), "top_k": (1.0, 10, 1.0), "top_p": (1.0, None, 0.8),
         "all": (0.6, 20, 0.9), "hot_all": (1.5, 30, 0.7)}


def _logits(rows: int = 6, seed: int = 0) -> torch.Tensor:
    """Random logits with a spread like a model's (some likely tokens, a long tail)."""
    gen = torch.Generator().manual_seed(seed)
    return 1.2 * torch.randn(rows, VOCAB, generator=gen)


def _transformers_processors(hf, temperature: float, top_k, top_p: float):
    """The logits processors transformers' generate builds for sampling with these settings, in its order."""
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0 if top_k is None else top_k,
                              top_p=top_p)
    return hf._get_logits_processor(generation_config=config, input_ids_seq_length=1, logits_processor=None)


@pytest.fixture(scope="module")
def hf():
    return make_hf(tiny_kwargs(vocab_size=VOCAB))


@pytest.mark.parametrize("case", sorted(CASES))
def test_processed_distribution_equals_transformers(case, hf):
    temperature, top_k, top_p = CASES[case]
    processors = _transformers_processors(hf, temperature, top_k, top_p)
    # the processors transformers chose for this case, in its order (so the comparison below means something)
    expected_kinds = [kind for kind, on in ((TemperatureLogitsWarper, temperature != 1.0), (TopKLogitsWarper, top_k),
                                             (TopPLogitsWarper, top_p < 1.0)) if on]
    assert [type(p) for p in processors] == expected_kinds
    logits = _logits(seed=sorted(CASES).index(case))
    theirs = processors(torch.zeros(logits.shape[0], 1, dtype=torch.long), logits.clone()).softmax(dim=-1)
    ours = processed_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    assert torch.equal(ours, theirs), f"{case}: max diff {(ours - theirs).abs().max():.3g}"
    kept = (ours > 0).sum(dim=-1)
    if top_k is not None or top_p < 1.0:  # a cut case really cuts, on every row, yet keeps more than one token
        assert (kept < VOCAB).all() and (kept > 1).all(), f"{case}: kept {kept.tolist()} of {VOCAB}"


def _draw_counts(logits: torch.Tensor, temperature: float, top_k, top_p, draws: int) -> torch.Tensor:
    """(rows, V) counts of `draws` seeded sample_next draws per row (one call: every row repeated)."""
    rows = logits.shape[0]
    tokens = sample_next(logits.repeat_interleave(draws, dim=0), temperature, top_k, top_p,
                         generator=torch.Generator().manual_seed(1234))
    return torch.zeros(rows, VOCAB).index_put_((torch.arange(rows).repeat_interleave(draws), tokens),
                                               torch.ones(rows * draws), accumulate=True)


def _chi2_within_bound(counts: torch.Tensor, probs: torch.Tensor) -> tuple[bool, float, int]:
    """Pearson's chi-square of one row's counts against probs (cells expecting < 5 pooled), and whether it lies
    under dof + 6 sd (chi-square's sd is sqrt(2 dof)): far in the tail, and the seed is fixed."""
    expected = probs * counts.sum()
    big, small = expected >= 5, (expected < 5) & (probs > 0)
    observed = torch.cat([counts[big], counts[small].sum()[None]])
    wanted = torch.cat([expected[big], expected[small].sum()[None]])
    observed, wanted = observed[wanted > 0], wanted[wanted > 0]
    chi2, dof = float(((observed - wanted) ** 2 / wanted).sum()), len(wanted) - 1
    return chi2 < dof + 6 * (2 * dof) ** 0.5 + 1, chi2, dof


@pytest.mark.parametrize("case", sorted(CASES))
def test_seeded_draws_follow_the_probabilities(case):
    temperature, top_k, top_p = CASES[case]
    logits = _logits(4, seed=7)
    probs = processed_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    counts = _draw_counts(logits, temperature, top_k, top_p, draws=20_000)
    assert (counts[probs == 0] == 0).all(), f"{case}: a cut token was drawn"
    for row in range(logits.shape[0]):
        ok, chi2, dof = _chi2_within_bound(counts[row], probs[row])
        assert ok, f"{case}, row {row}: chi2 {chi2:.1f} on {dof} dof"


def test_the_chi_square_bound_catches_a_wrong_temperature():
    # the bound has power: draws at temperature 0.7 judged against temperature 1's probabilities fail it
    logits = _logits(4, seed=7)
    counts = _draw_counts(logits, 0.7, None, None, draws=20_000)
    probs = processed_logits(logits, 1.0, None, None).softmax(dim=-1)
    assert not any(_chi2_within_bound(counts[row], probs[row])[0] for row in range(4))


def test_greedy_completions_equal_transformers_generate(tmp_path):
    """A folder saved by transformers, loaded by us: the rollout at temperature 0 is transformers' greedy output."""
    hf = make_hf(tiny_kwargs(vocab_size=VOCAB), seed=4)
    hf.save_pretrained(tmp_path)
    ours = Mistral.from_pretrained(tmp_path).eval()
    gen = torch.Generator().manual_seed(5)
    ids, mask = pad_batch([torch.randint(3, VOCAB, (n,), generator=gen) for n in (7, 3, 5, 1)], 0, side="left")
    new, pad = 16, 0
    free = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=pad,
                       eos_token_id=None)[:, ids.shape[1]:]
    # an EOS that some rows emit and others do not: both stops and truncation are compared
    eos = next(t for t in free[0].tolist() if not all(bool((row == t).any()) for row in free))
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             pad_token_id=pad, eos_token_id=eos)[:, ids.shape[1]:]
    expected = completions_from_tokens(theirs, eos, pad)
    spec = GRPOSpec(num_generations=2, max_completion_length=new, temperature=0.0)
    got = generate_completions(ours, ids, mask, spec, eos, pad, generator=None)
    assert expected.truncated.any() and not expected.truncated.all()
    # group copies of prompt i are rows 2i, 2i+1: each equals transformers' row i
    for name in ("ids", "mask", "truncated"):
        want = getattr(expected, name).repeat_interleave(2, dim=0)
        assert torch.equal(getattr(got, name), want), f"{name}: ours\n{getattr(got, name)}\ntransformers\n{want}"
