"""The GRPO/RLOO rollout objective (train/online.py) and its step (train/rl_step.py), without fit():
per-token completion log-probs against a full-logits log-softmax, advantages over the whole window, the masks
micro-batches carry, old log-probs, a step's loss against grpo_loss / the RLOO formula on hand-built tensors,
accumulation, window reuse and the resumable state. Completions are fed through a stand-in for
rollout.sampling.generate_completions (monkeypatched, as the design asks), rewards through a stand-in RewardSet."""

from __future__ import annotations

import contextlib
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from mistral_train.config import GRPOSpec
from mistral_train.errors import ConfigError
from mistral_train.losses.grpo import group_advantages, grpo_loss
from mistral_train.losses.rloo import rloo_advantages, rloo_loss
from mistral_train.rollout import sampling
from mistral_train.rollout.rewards import RewardSet
from mistral_train.rollout.sampling import completions_from_tokens
from mistral_train.train.loop import backward_window
from mistral_train.train.online import Rollout, check_spec, online_objective
from mistral_train.train.rl_step import completion_logps
from tests._tiny import tiny_model

EOS, PAD, G = 2, 0, 4


class LengthReward:
    """Stand-in RewardSet: one function, the completion's length in characters (decode gives 1 char a token)."""

    names = ["length"]
    weights = torch.tensor([1.0])

    def __init__(self):
        self.calls = []

    def score(self, prompts, completions, rows, **_):
        self.calls.append((prompts, completions, rows))
        return torch.tensor([[float(len(c))] for c in completions])

    combine = RewardSet.combine  # the real weighted nansum


def fake_generate(max_len=5):
    """Completions drawn from the generator (so its state decides them), EOS at a random place or none."""
    calls = []

    def generate(model, prompt_ids, prompt_mask, spec, eos_token_id, pad_id, generator):
        calls.append(prompt_ids.shape[0])
        n = prompt_ids.shape[0] * spec.num_generations
        tokens = torch.randint(3, 60, (n, max_len), generator=generator)
        stop = torch.randint(0, max_len + 2, (n,), generator=generator)  # >= max_len: truncated
        for row, s in enumerate(stop.tolist()):
            if s < max_len:
                tokens[row, s] = eos_token_id
        return completions_from_tokens(tokens, eos_token_id, pad_id)

    generate.calls = calls
    return generate


def prompt_batches(n_batches, prompts=2, seed=0):
    """An endless iterator of prompt batches: left-padded (P, T) ids of lengths 2..4, row_index."""
    g = torch.Generator().manual_seed(seed)
    i = 0
    while True:
        lengths = torch.randint(2, 5, (prompts,), generator=g).tolist()
        T = max(lengths)
        ids = torch.full((prompts, T), PAD, dtype=torch.long)
        mask = torch.zeros((prompts, T), dtype=torch.long)
        for r, n in enumerate(lengths):
            ids[r, T - n:] = torch.randint(3, 60, (n,), generator=g)
            mask[r, T - n:] = 1
        yield {"prompt_ids": ids, "prompt_mask": mask, "row_index": torch.arange(i, i + prompts) % n_batches}
        i += prompts


ROWS = [{"prompt": [{"role": "user", "content": f"q{i}"}], "fields": {"answer": str(i)}} for i in range(16)]


def make_rollout(spec, rloo=False, reference=None, seed=0):
    return Rollout(spec, rloo, LengthReward(), lambda ids: "x" * len(ids), ROWS, EOS, PAD, reference,
                   lambda m: m, lambda t: t, torch.device("cpu"), contextlib.nullcontext, 16, seed)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return tiny_model()


def test_completion_logps_equal_log_softmax_of_the_full_logits(model):
    """Per-token log-probs at temperature t equal log_softmax(logits / t) gathered at each completion token, the
    positions counting real tokens only (left padding), 0 off the completion mask."""
    batch = next(prompt_batches(8))
    out = completions_from_tokens(torch.tensor([[5, 6, EOS, 9], [7, 8, 9, 10]]), EOS, PAD)
    batch = {"prompt_ids": batch["prompt_ids"], "prompt_mask": batch["prompt_mask"],
             "completion_ids": out.ids, "completion_mask": out.mask}
    got = completion_logps(model, batch, temperature=0.7, chunk=3)
    ids = torch.cat([batch["prompt_ids"], out.ids], 1)
    mask = torch.cat([batch["prompt_mask"], out.mask], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(ids, attention_mask=mask, position_ids=positions).float() / 0.7
    T = batch["prompt_ids"].shape[1]
    want = F.log_softmax(logits[:, T - 1:-1], -1).gather(-1, out.ids[..., None]).squeeze(-1) * out.mask
    assert got.shape == out.ids.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # after EOS: masked; row 1 is truncated, so all its tokens count
    assert float(got[0, 3].detach()) == 0.0 and float(got[1, 3].detach()) != 0.0


def test_advantages_span_the_window_and_every_process(monkeypatch, model):
    """scale_rewards=batch: the std is the whole window's (two micro-batches), as trl's generation batch; the
    group means stay per prompt. Two processes: each gets its own slice of advantages over both."""
    monkeypatch.setattr(sampling, "generate_completions", fake_generate())
    spec = GRPOSpec(num_generations=G, scale_rewards="batch", max_completion_length=5)
    rollout = make_rollout(spec)
    window, units, _ = rollout.draw(model, prompt_batches(8), grad_accum_steps=2)
    rewards = torch.cat([b["completion_mask"].sum(-1).float() for b in window])  # length reward == mask sum here
    want = group_advantages(rewards, G, "batch")
    torch.testing.assert_close(torch.cat([b["advantages"] for b in window]), want)
    alone = group_advantages(rewards[:2 * G], G, "batch")
    assert not torch.allclose(window[0]["advantages"], alone)  # a per-micro-batch std would differ
    assert units == int(sum(b["completion_mask"].sum() for b in window))  # dapo: the window's completion tokens

    # process 1 of 2 sees the other half of the gathered window: fake the gather with process 0's rewards first
    other = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 5.0, 5.0])  # process 0's one micro-batch: 2 prompts x G
    gathered = lambda t: torch.cat([other.to(t.dtype) if t.dim() == 1 and len(t) == len(other) else t, t])  # noqa: E731
    monkeypatch.setattr(sampling, "generate_completions", fake_generate())
    rank1 = make_rollout(spec)
    rank1.gather = gathered
    mine, _, _ = rank1.draw(model, prompt_batches(8), grad_accum_steps=1, num_processes=2, process_index=1)
    mine_rewards = torch.cat([b["completion_mask"].sum(-1).float() for b in mine])
    want = group_advantages(torch.cat([other, mine_rewards]), G, "batch")[len(other):]
    torch.testing.assert_close(torch.cat([b["advantages"] for b in mine]), want)


def test_micro_batches_carry_the_completion_masks(monkeypatch, model):
    """Each micro-batch: the prompts repeated num_generations times (prompt i at rows i*G..), the completions and
    their mask through EOS; mask_truncated_completions zeroes the truncated rows; rewards read decoded text of
    the masked-in tokens and each completion's row fields."""
    fake = fake_generate()
    monkeypatch.setattr(sampling, "generate_completions", fake)
    spec = GRPOSpec(num_generations=G, max_completion_length=5, mask_truncated_completions=True, loss_type="grpo")
    rollout = make_rollout(spec)
    prompts = prompt_batches(8)
    first = next(prompt_batches(8))
    window, units, meter = rollout.draw(model, prompts, grad_accum_steps=1)
    batch = window[0]
    torch.testing.assert_close(batch["prompt_ids"], first["prompt_ids"].repeat_interleave(G, 0))
    # the same draw again, to see what the sampler gave
    fresh = make_rollout(spec).generator  # the rollout's seed, then micro-batch 0's generator
    g = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=fresh)) + 0)
    raw = fake(None, first["prompt_ids"], first["prompt_mask"], spec, EOS, PAD, g)
    torch.testing.assert_close(batch["completion_ids"], raw.ids)
    assert raw.truncated.any() and not raw.truncated.all()
    torch.testing.assert_close(batch["completion_mask"], raw.mask * (~raw.truncated).long()[:, None])
    _, texts, rows = rollout.reward_set.calls[0]
    assert texts == ["x" * int(n) for n in raw.mask.sum(-1)]  # the reward still sees the truncated text
    assert [r["answer"] for r in rows] == [str(int(i)) for i in first["row_index"].repeat_interleave(G)]
    assert units == 1 and float(batch["share"]) == 1.0  # grpo: one unit per micro-batch
    assert meter[0]["input_ids"].shape == (2 * G, first["prompt_ids"].shape[1] + raw.ids.shape[1])
    assert "old_logps" not in batch and "ref_logps" not in batch  # num_iterations 1, beta 0: nothing kept


def test_a_micro_batch_samples_the_same_completions_on_any_process_count(monkeypatch, model):
    """One process with grad_accum_steps 2 and process k of two with 1 each draw the same prompt batches and
    sample the same completions for each (one generator per micro-batch, seeded by its place in the window)."""
    monkeypatch.setattr(sampling, "generate_completions", fake_generate())
    spec = GRPOSpec(num_generations=G, max_completion_length=5, loss_type="grpo")
    one, _, _ = make_rollout(spec).draw(model, prompt_batches(8), 2)
    for rank in (0, 1):
        rollout = make_rollout(spec)
        rollout.gather = lambda t: torch.cat([t, t])  # two processes' worth (advantages are not compared here)
        mine, _, _ = rollout.draw(model, prompt_batches(8), 1, num_processes=2, process_index=rank)
        for key in ("prompt_ids", "completion_ids", "completion_mask"):
            assert torch.equal(mine[0][key], one[rank][key])
    assert not torch.equal(one[0]["completion_ids"], one[1]["completion_ids"])


def test_old_logps_equal_the_policy_logps_before_the_update(monkeypatch, model):
    """num_iterations 2: old log-probs are kept at rollout and equal the step's first forward, so the first
    pass's ratio is 1 and its loss equals the num_iterations 1 loss (which uses logps.detach())."""
    monkeypatch.setattr(sampling, "generate_completions", fake_generate())
    spec = GRPOSpec(num_generations=G, max_completion_length=5, num_iterations=2, loss_type="grpo")
    window, _, _ = make_rollout(spec).draw(model, prompt_batches(8), 1)
    batch = window[0]
    torch.testing.assert_close(batch["old_logps"], completion_logps(model, batch, 1.0, 16))
    twice = online_objective(spec, False, 16, make_rollout(spec)).step(model, batch)
    once = online_objective(replace(spec, num_iterations=1), False, 16, make_rollout(spec)).step(
        model, {k: v for k, v in batch.items() if k != "old_logps"})
    torch.testing.assert_close(twice.loss_sum, once.loss_sum)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_a_fixed_completions_step_equals_grpo_loss_on_hand_built_tensors(monkeypatch, model, loss_type):
    """With fixed completions and a reference (beta 0.1), one optimizer window of two micro-batches through the
    loop's backward_window equals trl's normalisation of grpo_loss on log-probs computed by hand (full logits):
    the mean of the micro-batch losses (grpo, dr_grpo), the token sum over the window's tokens (dapo)."""
    monkeypatch.setattr(sampling, "generate_completions", fake_generate())
    spec = GRPOSpec(num_generations=G, max_completion_length=5, loss_type=loss_type, beta=0.1, num_iterations=2)
    ref_model = tiny_model()
    reference = lambda _policy, b: completion_logps(ref_model, b, 1.0, 16)  # noqa: E731
    rollout = make_rollout(spec, reference=reference)
    objective = online_objective(spec, False, 16, rollout)
    window, units, _ = objective.draw(model, prompt_batches(8), 2)
    with torch.no_grad():  # a small update between rollout and step, so the ratio is not 1 everywhere
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss, n, stats = backward_window(model, objective, window, contextlib.nullcontext, n_tokens=units)

    def hand_logps(b):
        ids = torch.cat([b["prompt_ids"], b["completion_ids"]], 1)
        mask = torch.cat([b["prompt_mask"], b["completion_mask"]], 1)
        logits = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).float()
        T = b["prompt_ids"].shape[1]
        return F.log_softmax(logits[:, T - 1:-1], -1).gather(-1, b["completion_ids"][..., None]).squeeze(-1)

    tokens = sum(int(b["completion_mask"].sum()) for b in window)
    losses = [grpo_loss(hand_logps(b), b["old_logps"], b["advantages"], b["completion_mask"], loss_type=loss_type,
                        beta=0.1, ref_logps=b["ref_logps"], max_completion_length=5, num_items=tokens)[0]
              for b in window]
    want = sum(losses) if loss_type == "dapo" else sum(losses) / 2  # trl: dapo's num_items spans the window
    assert loss == pytest.approx(float(want.detach()), rel=1e-5)
    assert "kl" in stats and stats["kl"] > 0 and "clip_ratio/region_mean" in stats
    lengths = torch.cat([b["completion_mask"].sum(-1) for b in window]).float()
    assert stats["reward"] == pytest.approx(float(lengths.mean()), rel=1e-6)  # the window's mean, whatever the units
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_accumulation_of_two_micro_batches_equals_one_window_of_the_same_completions(monkeypatch, model, loss_type):
    """grad_accum_steps 2 of 2 prompts each gives the gradient of one micro-batch of the same 4 prompts'
    completions: dapo normalises by the window's tokens either way, grpo averages equal-sized micro-batches."""
    spec = GRPOSpec(num_generations=G, max_completion_length=5, loss_type=loss_type)
    monkeypatch.setattr(sampling, "generate_completions", fake_generate())
    objective = online_objective(spec, False, 16, make_rollout(spec))
    window, units, _ = objective.draw(model, prompt_batches(8), 2)
    backward_window(model, objective, window, contextlib.nullcontext, n_tokens=units)
    split = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    width = max(b["prompt_ids"].shape[1] for b in window)

    def left(t, w):
        return F.pad(t, (w - t.shape[1], 0), value=0)

    merged = {"prompt_ids": torch.cat([left(b["prompt_ids"], width) for b in window]),
              "prompt_mask": torch.cat([left(b["prompt_mask"], width) for b in window])}
    for key in ("completion_ids", "completion_mask", "advantages"):
        merged[key] = torch.cat([b[key] for b in window])
    merged["share"] = torch.tensor(1.0)
    backward_window(model, objective, [merged], contextlib.nullcontext, n_tokens=units if loss_type == "dapo" else 1)
    for a, p in zip(split, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-5)


def test_the_window_is_reused_num_iterations_times_and_resumes_exactly(monkeypatch, model):
    """num_iterations 3: one rollout serves three draws; a Rollout restored from state_dict() mid-window (its
    tensors through torch.save / torch.load(weights_only=True)) serves the same window, then samples the same
    next rollout as the uninterrupted one (the generation RNG is in the state)."""
    fake = fake_generate()
    monkeypatch.setattr(sampling, "generate_completions", fake)
    spec = GRPOSpec(num_generations=G, max_completion_length=5, num_iterations=3, loss_type="grpo")
    straight, prompts = make_rollout(spec), prompt_batches(8)
    first = straight.draw(model, prompts, 1)[0]
    assert straight.draw(model, prompts, 1)[0] is first and len(fake.calls) == 1
    import io
    buffer = io.BytesIO()
    torch.save(straight.state_dict(), buffer)
    buffer.seek(0)
    resumed, resumed_prompts = make_rollout(spec, seed=123), prompt_batches(8)
    next(resumed_prompts)  # the data position is the loop's to restore: one batch was drawn
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    third_a, third_b = straight.draw(model, prompts, 1)[0], resumed.draw(model, resumed_prompts, 1)[0]
    for a, b in zip(third_a, third_b):
        assert all(torch.equal(a[k], b[k]) for k in a)
    fourth_a, fourth_b = straight.draw(model, prompts, 1)[0], resumed.draw(model, resumed_prompts, 1)[0]
    assert fourth_a is not third_a  # a new rollout after three uses
    for a, b in zip(fourth_a, fourth_b):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_rloo_advantages_and_loss_equal_the_hand_formula():
    """Leave-one-out baselines with the NaN rules, optional standardisation; the sequence-level clipped loss."""
    adv = rloo_advantages(torch.tensor([1.0, 2.0, 4.0, float("nan"), 3.0, 5.0]), 3)
    # group 1: baselines (2+4)/2, (1+4)/2, (1+2)/2; group 2: the NaN gets 0, the others' only sibling is each other
    torch.testing.assert_close(adv, torch.tensor([1 - 3.0, 2 - 2.5, 4 - 1.5, 0.0, 3 - 5.0, 5 - 3.0]))
    torch.testing.assert_close(rloo_advantages(torch.tensor([1.0, float("nan"), 2.0, 2.0]), 2),
                               torch.tensor([0.0, 0.0, 0.0, 0.0]))  # a lone scorable completion: no baseline
    norm = rloo_advantages(torch.tensor([1.0, 2.0, 4.0, 3.0, 3.0, 3.0]), 3, normalize=True)
    full = torch.tensor([-2.0, -0.5, 2.5, 0.0, 0.0, 0.0])
    torch.testing.assert_close(norm, (full - full.mean()) / (full.std() + 1e-4))

    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.5, -9.0], [-1.0, -0.5, -0.5]])  # token 2 of row 0 is masked out
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    a = torch.tensor([1.0, -2.0])
    loss, stats = rloo_loss(logps, old, a, mask, 0.2, 0.3)
    r = torch.exp(torch.tensor([-3.0 - -3.5, -1.5 - -2.0]))  # one ratio per sequence: both e^0.5 = 1.65
    want = -torch.min(r * a, r.clamp(0.8, 1.3) * a).mean()
    assert float(loss.detach()) == pytest.approx(float(want))
    assert stats["clip_ratio/high_mean"] == 0.5 and stats["clip_ratio/region_mean"] == 0.5  # row 0: r > 1.3, A > 0
    assert stats["clip_ratio/low_mean"] == 0.0
    loss.backward()
    assert logps.grad[0].abs().sum() == 0  # clipped: no gradient (and none on the masked token anyway)
    torch.testing.assert_close(logps.grad[1], torch.full((3,), float(-r[1] * a[1] / 2)))  # d(-r A / 2)/d logp_t


def test_rloo_rollout_penalises_kl_in_the_reward(monkeypatch, model):
    """RLOO with beta: old log-probs are kept (its ratio is against them) and the advantages are leave-one-out
    over reward - beta * sum(old - ref); the metrics' reward stays the functions' reward."""
    monkeypatch.setattr(sampling, "generate_completions", fake_generate())
    spec = GRPOSpec(num_generations=G, max_completion_length=5, beta=0.5)
    ref_model = tiny_model()
    rollout = make_rollout(spec, rloo=True, reference=lambda _p, b: completion_logps(ref_model, b, 1.0, 16))
    window, units, _ = rollout.draw(model, prompt_batches(8), 1)
    b = window[0]
    rewards = b["completion_mask"].sum(-1).float()
    kl = ((b["old_logps"] - b["ref_logps"]) * b["completion_mask"]).sum(-1)
    torch.testing.assert_close(b["advantages"], rloo_advantages(rewards - 0.5 * kl, G))
    assert units == 1 and float(b["metric/reward"]) == pytest.approx(float(rewards.mean()))
    assert float(b["metric/kl"]) == pytest.approx(float(kl.sum() / b["completion_mask"].sum()))  # trl: per token
    out = online_objective(spec, True, 16, rollout).step(model, b)
    want, _ = rloo_loss(completion_logps(model, b, 1.0, 16), b["old_logps"], b["advantages"],
                        b["completion_mask"].float())
    torch.testing.assert_close(out.loss_sum, want)


@pytest.mark.parametrize("change, key", [(dict(loss_type="ppo"), "trainer.grpo.loss_type='ppo'"),
                                         (dict(scale_rewards="std"), "trainer.grpo.scale_rewards='std'"),
                                         (dict(num_iterations=0), "trainer.grpo.num_iterations=0"),
                                         (dict(rollout_engine="sglang"), "trainer.grpo.rollout_engine='sglang'"),
                                         (dict(num_generations=1), "trainer.grpo.num_generations=1")])
def test_settings_the_rollout_cannot_run_are_one_line_config_errors(change, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        check_spec(replace(GRPOSpec(), **change), rloo=True)


@pytest.mark.parametrize("scale, rloo, want", [("group", False, 0.5), ("batch", False, 0.0), ("batch", True, 0.5)])
def test_frac_reward_zero_std_is_trls(scale, rloo, want, model):
    """trl's GRPO asks whether each group's rewards spread (whether the whole window's do under scale_rewards=batch);
    RLOO always per group. Group 1 (3, 3) does not spread, group 2 (1, 2) does."""
    rollout = make_rollout(GRPOSpec(num_generations=2, scale_rewards=scale), rloo=rloo)
    assert float(rollout._zero_spread(torch.tensor([3.0, 3.0, 1.0, 2.0]), 2)) == want


def test_reward_functions_get_string_prompts_as_strings_and_each_rows_place(monkeypatch, model):
    """A row whose prompt was a string reaches the reward functions as that string (trl's standard kind), a
    message-list prompt as messages; each completion's "FILE row K" goes with it, for the error naming it."""
    monkeypatch.setattr(sampling, "generate_completions", fake_generate())
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "fields": {"answer": str(i)},
             "source": "prompts.jsonl", "row": i + 1, **({"prompt_text": f"q{i}"} if i % 2 else {})}
            for i in range(16)]
    seen = []

    class Recording(LengthReward):
        def score(self, prompts, completions, rows, where=None, **_):
            seen.append((prompts, where))
            return super().score(prompts, completions, rows)

    spec = GRPOSpec(num_generations=G, max_completion_length=5, loss_type="grpo")
    rollout = Rollout(spec, False, Recording(), lambda ids: "x" * len(ids), rows, EOS, PAD, None,
                      lambda m: m, lambda t: t, torch.device("cpu"), contextlib.nullcontext, 16, 0)
    first = next(prompt_batches(8))
    rollout.draw(model, prompt_batches(8), grad_accum_steps=1)
    prompts, where = seen[0]
    for i, prompt, place in zip(first["row_index"].repeat_interleave(G).tolist(), prompts, where):
        assert prompt == (f"q{i}" if i % 2 else [{"role": "user", "content": f"q{i}"}])
        assert place == f"prompts.jsonl row {i + 1}"
