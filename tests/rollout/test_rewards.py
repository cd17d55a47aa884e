"""Reward functions (mistral_train/rollout/rewards.py): the built-ins against hand values, trl's calling
convention for functions named by import path, trl's weighted nansum, every error message, and a reward
model folder scored equal to transformers' MistralForSequenceClassification on the chat template's text."""

from __future__ import annotations

import math
import textwrap
from types import SimpleNamespace

import pytest
import torch

from mistral_train.errors import ConfigError, UserError
from mistral_train.rollout.rewards import (RewardError, build_rewards, exact_answer, format_regex, length_penalty,
                                           normalize_answer)
from mistral_train.tokenizer.files import write_tokenizer_files
from tests._tokenizers import bundled
from tests.oracle._trl_rl import trl_score_window

BUILTIN = "mistral_train.rollout.rewards:"


def spec(funcs: list, weights: list | None = None) -> SimpleNamespace:
    """The two trainer.grpo fields build_rewards reads."""
    return SimpleNamespace(reward_funcs=funcs, reward_weights=weights)


def rows(n: int, **fields) -> list[dict]:
    return [{k: v[i] for k, v in fields.items()} for i in range(n)]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module `my_rewards` on sys.path, whose functions record how they were called."""
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        CALLS = []
        NOT_CALLABLE = 3

        def recorder(prompts, completions, completion_ids=None, **kwargs):
            CALLS.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs))
            return [float(len(str(c))) for c in completions]

        def sometimes_none(completions, **kwargs):
            return [None if i % 2 else 1.0 for i in range(len(completions))]

        def boom(completions, **kwargs):
            raise ValueError("no such\\nthing")  # two lines: one in the message

        def as_tuple(completions, **kwargs):
            return tuple(1.0 for _ in completions)

        def one_short(completions, **kwargs):
            return [1.0] * (len(completions) - 1)

        def a_bool(completions, **kwargs):
            return [1.0, True][: len(completions)]

        def a_string(completions, **kwargs):
            return ["0.5"] * len(completions)

        async def later(completions, **kwargs):
            return [0.25 * len(c) for c in completions]
    """))
    (tmp_path / "broken_rewards.py").write_text("raise RuntimeError('cannot start')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys
    sys.modules.pop("my_rewards", None)
    return importlib.import_module("my_rewards")


# ---- built-ins against hand values ------------------------------------------------------------------------

def test_exact_answer_normalises_as_held_out_exact_match():
    completions = ["  Sunday. ", "monday", "3.5", "The  cat\n", "3.5!"]
    answers = ["sunday", "Sunday", "3.5", "the cat", "3"]
    assert exact_answer(completions=completions, answer=answers) == [1.0, 0.0, 1.0, 1.0, 0.0]
    conversational = [[{"role": "assistant", "content": c}] for c in completions]
    assert exact_answer(completions=conversational, answer=answers) == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert exact_answer(completions=["42"], answer=[42]) == [1.0]  # a number answer compares as its text
    # the same normalisation as train/evaluate.py's exact match (one function)
    from mistral_train.train.evaluate import normalize_answer as evaluate_normalize
    assert evaluate_normalize("  Sunday. ") == normalize_answer("  Sunday. ") == "sunday"


def test_format_regex_fullmatch_dotall():
    pattern = r"<think>.*</think>\s*<answer>\d+</answer>"
    completions = ["<think>a\nb</think>\n<answer>12</answer>",  # DOTALL: the thought spans lines
                   "<think>a</think><answer>x</answer>",  # not a number
                   "say <think>a</think><answer>1</answer>",  # fullmatch: nothing before
                   "<think></think><answer>7</answer> "]  # fullmatch: nothing after
    assert format_regex(completions=completions, pattern=pattern) == [1.0, 0.0, 0.0, 0.0]


def test_length_penalty_in_characters():
    completions = ["x" * 10, "x" * 4, "x" * 15, ""]
    # -scale * |len - target| / target with target 10, scale 0.5: 0, -0.3, -0.25, -0.5
    assert length_penalty(completions=completions, target_length=10, scale=0.5) == pytest.approx(
        [0.0, -0.3, -0.25, -0.5], abs=1e-12)
    assert length_penalty(completions=[[{"role": "assistant", "content": "abc"}]], target_length=2) == [-0.5]


def test_builtins_load_by_import_path_with_kwargs():
    rs = build_rewards(spec([BUILTIN + "exact_answer",
                             {"function": BUILTIN + "format_regex", "kwargs": {"pattern": r"\d+"}},
                             {"function": BUILTIN + "length_penalty", "kwargs": {"target_length": 2, "scale": 2.0}}]),
                       bundled())
    assert rs.names == ["exact_answer", "format_regex", "length_penalty"]
    scores = rs.score(["Q1", "Q2"], ["12", "no"], rows(2, answer=["12", "yes"]))
    # exact: 1, 0; regex: 1, 0; length: -2*|2-2|/2 = 0, -2*|2-2|/2 = 0
    assert torch.equal(scores, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))


# ---- trl's calling convention -----------------------------------------------------------------------------

def test_string_prompts_get_plain_strings_and_columns(user_module):
    rs = build_rewards(spec(["my_rewards:recorder"]), bundled())
    out = rs.score(["Q1", "Q1", "Q2"], ["a", "bb", "ccc"], rows(3, answer=["x", "x", "y"], level=[1, 1, 2]),
                   completion_ids=[[5, 2], [6, 7, 2], [8]])
    call = user_module.CALLS[-1]
    assert call == dict(prompts=["Q1", "Q1", "Q2"], completions=["a", "bb", "ccc"],
                        completion_ids=[[5, 2], [6, 7, 2], [8]], answer=["x", "x", "y"], level=[1, 1, 2])
    assert out.dtype == torch.float32 and torch.equal(out, torch.tensor([[1.0], [2.0], [3.0]]))


def test_message_prompts_get_trl_conversational_form_and_kwargs_win(user_module):
    rs = build_rewards(spec([{"function": "my_rewards:recorder", "kwargs": {"level": 9, "bonus": 0.5}}]), bundled())
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rs.score([prompt, prompt], ["yo", "hey"], rows(2, level=[1, 2], prompt=["raw", "raw"]))
    call = user_module.CALLS[-1]
    assert call["prompts"] == [prompt, prompt]
    assert call["completions"] == [[{"role": "assistant", "content": "yo"}], [{"role": "assistant", "content": "hey"}]]
    assert call["level"] == 9 and call["bonus"] == 0.5  # the entry's kwargs win over a column of the same name
    assert "prompt" not in {k for k in call if k != "prompts"}  # trl keeps prompt/completion columns out
    assert call["completion_ids"] is None


def test_async_function_is_awaited(user_module):
    rs = build_rewards(spec(["my_rewards:later"]), bundled())
    assert rs.score(["Q", "Q"], ["ab", "abcd"], [{}, {}]).tolist() == [[0.5], [1.0]]


def test_names_from_function_entry_or_suffix(user_module):
    rs = build_rewards(spec(["my_rewards:recorder", "my_rewards:recorder", {"function": "my_rewards:recorder",
                                                                              "name": "mine"},
                             {"function": "my_rewards:sometimes_none", "name": "recorder"}]), bundled())
    assert rs.names == ["recorder", "recorder_2", "mine", "recorder_3"]


# ---- weights: trl's nansum of weighted columns ------------------------------------------------------------

def test_combine_is_trl_weighted_nansum(user_module):
    rs = build_rewards(spec(["my_rewards:recorder", "my_rewards:sometimes_none", BUILTIN + "exact_answer"],
                            [0.5, 2.0, -1.0]), bundled())
    scores = rs.score(["Q"] * 4, ["a", "bb", "c", "dddd"], rows(4, answer=["a", "x", "c", "y"]))
    assert torch.isnan(scores[1, 1]) and torch.isnan(scores[3, 1])  # None -> NaN, as trl
    by_hand = []
    for row in scores.tolist():  # sum of weight * score over the scores that are not NaN
        by_hand.append(sum(w * s for w, s in zip([0.5, 2.0, -1.0], row) if not math.isnan(s)))
    # [0.5*1 + 2*1 - 1*1, 0.5*2 + 0 - 0, 0.5*1 + 2*1 - 1, 0.5*4 + 0 - 0]
    assert by_hand == [1.5, 1.0, 1.5, 2.0]
    assert torch.equal(rs.combine(scores), torch.tensor(by_hand))
    # a row no function scored is NaN, not 0 (trl's unscorable_mask: kept out of the group baseline)
    mixed = torch.tensor([[float("nan")] * 3, [float("nan"), 1.0, float("nan")]])
    combined = rs.combine(mixed)
    assert torch.isnan(combined[0]) and combined[1].item() == 2.0


def test_weights_per_entry_and_default_one(user_module):
    rs = build_rewards(spec([{"function": "my_rewards:recorder", "weight": 0.25}, "my_rewards:recorder"]), bundled())
    assert rs.weights.tolist() == [0.25, 1.0]
    assert build_rewards(spec(["my_rewards:recorder"], [3]), bundled()).weights.tolist() == [3.0]


@pytest.mark.parametrize("funcs, weights, message", [
    ([{"function": "my_rewards:recorder", "weight": 2.0}, "my_rewards:recorder"], [1.0, 1.0],
     "trainer.grpo.reward_funcs[0].weight and trainer.grpo.reward_weights both set the weights; use one of them"),
    (["my_rewards:recorder"], [1.0, 2.0],
     "trainer.grpo.reward_weights has 2 weights for 1 reward functions; expected one per entry"),
    (["my_rewards:recorder"], [True], "trainer.grpo.reward_weights[0]: expected a finite number, got True"),
    ([{"function": "my_rewards:recorder", "weight": "high"}], None,
     "trainer.grpo.reward_funcs[0].weight: expected a finite number, got 'high'"),
])
def test_weight_errors(user_module, funcs, weights, message):
    with pytest.raises(ConfigError, match="^" + message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        build_rewards(spec(funcs, weights), bundled())


# ---- configuration errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("entry, message", [
    ("my_rewards.recorder", "trainer.grpo.reward_funcs[0]='my_rewards.recorder': expected 'package.module:function'"),
    ("no_such_module_here:f", "trainer.grpo.reward_funcs[0]='no_such_module_here:f': module 'no_such_module_here' "
                              "does not import (ModuleNotFoundError: No module named 'no_such_module_here')"),
    ("broken_rewards:f", "trainer.grpo.reward_funcs[0]='broken_rewards:f': module 'broken_rewards' does not import "
                         "(RuntimeError: cannot start)"),
    ("my_rewards:missing", "trainer.grpo.reward_funcs[0]='my_rewards:missing': 'my_rewards' has no attribute "
                           "'missing'"),
    ("my_rewards:NOT_CALLABLE", "trainer.grpo.reward_funcs[0]='my_rewards:NOT_CALLABLE': 'NOT_CALLABLE' is a int, "
                                "not a callable"),
    ({"function": "my_rewards:recorder", "model": "x"}, "trainer.grpo.reward_funcs[0]: expected exactly one of "
                                                         "'function' or 'model'"),
    ({"funtion": "my_rewards:recorder"}, "trainer.grpo.reward_funcs[0]: expected exactly one of 'function' or "
                                         "'model' and only the keys"),
    ({"function": "my_rewards:nope"}, "trainer.grpo.reward_funcs[0].function='my_rewards:nope': 'my_rewards' has no "
                                      "attribute 'nope'"),
    ({"function": BUILTIN + "format_regex", "kwargs": {"pattern": "(unclosed"}},
     "trainer.grpo.reward_funcs[0].kwargs.pattern: format_regex: pattern '(unclosed' is not a regular expression"),
    ({"function": BUILTIN + "format_regex"},
     "trainer.grpo.reward_funcs[0].kwargs.pattern: format_regex needs a regular expression string, got None"),
    ({"function": BUILTIN + "length_penalty", "kwargs": {"target_length": 0}},
     "trainer.grpo.reward_funcs[0].kwargs.target_length: length_penalty needs a positive number of characters, got 0"),
    (42, "trainer.grpo.reward_funcs[0]: expected 'module:function' or a mapping with 'function' or 'model', got int"),
    ({"model": "/no/such/folder"}, "trainer.grpo.reward_funcs[0].model=/no/such/folder does not exist"),
])
def test_config_errors_name_the_entry(user_module, entry, message):
    with pytest.raises(ConfigError) as err:
        build_rewards(spec([entry]), bundled())
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_no_reward_function_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^trainer\.grpo\.reward_funcs is empty; name at least one"):
        build_rewards(spec([]), bundled())


# ---- errors while scoring ---------------------------------------------------------------------------------

WHERE = rows(2, source=["data/prompts.jsonl", "data/prompts.jsonl"], row=[7, 8])


@pytest.mark.parametrize("name, message", [
    ("boom", "reward function 'boom' (trainer.grpo.reward_funcs[0]) raised on data/prompts.jsonl row 7 "
             "(completion 0): ValueError: no such thing"),
    ("as_tuple", "reward function 'as_tuple' (trainer.grpo.reward_funcs[0]) returned a tuple on data/prompts.jsonl "
                 "row 7 (completion 0); expected a list of 2 floats (None: no score)"),
    ("one_short", "reward function 'one_short' (trainer.grpo.reward_funcs[0]) returned 1 scores for 2 completions "
                  "on data/prompts.jsonl row 7 (completion 0); expected one per completion"),
    ("a_bool", "reward function 'a_bool' (trainer.grpo.reward_funcs[0]) returned True (bool) on data/prompts.jsonl "
               "row 8 (completion 1); expected a float, an int or None"),
    ("a_string", "reward function 'a_string' (trainer.grpo.reward_funcs[0]) returned '0.5' (str) on "
                 "data/prompts.jsonl row 7 (completion 0); expected a float, an int or None"),
])
def test_scoring_errors_name_function_and_row(user_module, name, message):
    rs = build_rewards(spec([f"my_rewards:{name}"]), bundled())
    with pytest.raises(RewardError) as err:
        rs.score(["Q", "Q"], ["a", "b"], WHERE)
    assert str(err.value) == message
    assert isinstance(err.value, UserError)


def test_scoring_error_names_the_given_row_location(user_module):
    rs = build_rewards(spec(["my_rewards:boom"]), bundled())
    with pytest.raises(RewardError, match=r"raised on train\.jsonl row 3 \(completion 0\): ValueError"):
        rs.score(["Q"], ["a"], [{}], where=["train.jsonl row 3"])


def test_exact_answer_names_the_row_without_an_answer():
    rs = build_rewards(spec([BUILTIN + "exact_answer"]), bundled())
    with pytest.raises(RewardError) as err:
        rs.score(["Q", "Q"], ["a", "b"], [{**WHERE[0], "answer": "a"}, WHERE[1]])
    assert str(err.value) == ("reward function 'exact_answer' (trainer.grpo.reward_funcs[0]) raised on "
                              "data/prompts.jsonl row 8 (completion 1): RewardRowError: the row has no 'answer'; "
                              "exact_answer compares the completion with it")
    with pytest.raises(RewardError, match=r"row 7 \(completion 0\): RewardRowError: the rows have no 'answer' field"):
        rs.score(["Q", "Q"], ["a", "b"], WHERE)


# ---- a reward model folder --------------------------------------------------------------------------------

@pytest.fixture
def reward_folder(tmp_path, our_model, tiny):
    """A folder as a reward run's final/ holds it (model.save_pretrained + write_tokenizer_files, as
    train/loop.py writes it): our one-label sequence-classification Mistral with order-one random weights, pad
    id 0, the v1 tokenizer; and transformers' MistralForSequenceClassification read from that folder."""
    import transformers

    folder = tmp_path / "tiny_rm"
    ours = our_model(tiny(vocab_size=32000, num_labels=1, pad_token_id=0), task="sequence_classification")
    ours.save_pretrained(folder)
    write_tokenizer_files(bundled("v1"), folder, "v1")
    return folder, transformers.MistralForSequenceClassification.from_pretrained(folder).eval()


def test_reward_model_scores_equal_transformers(reward_folder):
    import transformers

    folder, hf = reward_folder
    rs = build_rewards(spec([{"model": str(folder), "weight": 0.5}]), bundled("v3"))  # the folder's tokenizer wins
    assert rs.names == ["tiny_rm"] and rs.weights.tolist() == [0.5]
    prompts = ["What is 2 + 2?", "Name a colour."] * 2
    completions = ["4", "Blue, like the sky on a clear day.", "four", "red"]  # lengths differ: padded batch
    ours = rs.score(prompts, completions, [{}] * 4)[:, 0]
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    expected = []
    with torch.no_grad():
        for prompt, completion in zip(prompts, completions):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
            expected.append(hf(torch.tensor([ids])).logits[0, 0].item())
    torch.testing.assert_close(ours, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    assert len(set(expected)) == 4  # the scores differ: the right token of each row was pooled
    # conversational prompts are the same text
    conversational = [[{"role": "user", "content": p}] for p in prompts]
    torch.testing.assert_close(rs.score(conversational, completions, [{}] * 4)[:, 0], ours, atol=1e-6, rtol=0)


def test_reward_model_folder_must_be_a_one_label_classifier(tmp_path, hf_model, tiny):
    causal = tmp_path / "lm"
    hf_model(tiny()).save_pretrained(causal)
    with pytest.raises(ConfigError, match=r"^trainer\.grpo\.reward_funcs\[0\]\.model=.*lm holds a causal_lm model; "
                                          r"a reward model is a sequence-classification folder"):
        build_rewards(spec([{"model": str(causal)}]), bundled())
    two = tmp_path / "two_labels"
    hf_model(tiny(num_labels=2, pad_token_id=0), task="sequence_classification").save_pretrained(two)
    with pytest.raises(ConfigError, match=r"^trainer\.grpo\.reward_funcs\[0\]\.model=.*two_labels has 2 labels"):
        build_rewards(spec([{"model": str(two)}]), bundled())


def _trl_rewards_and_advantages(scores: torch.Tensor, weights: torch.Tensor, names: list[str], G: int):
    """trl 1.16's own combination of `scores` (tests/oracle/_trl_rl.py trl_score_window). Returns (logged reward
    mean, advantages with scale_rewards="none": reward - group mean, 0 on unscorable rows)."""
    out, metrics = trl_score_window(scores, weights, names, G, "none")
    return metrics["reward"][-1], out["advantages"]


def test_combine_equals_trl_grpo_trainer(user_module):
    from mistral_train.losses import group_advantages

    rs = build_rewards(spec(["my_rewards:recorder", "my_rewards:sometimes_none", BUILTIN + "exact_answer"],
                            [0.5, 2.0, -1.0]), bundled())
    scores = rs.score(["Q"] * 4, ["a", "bb", "c", "dddd"], rows(4, answer=["a", "x", "c", "y"]))
    scores = torch.cat([scores, torch.tensor([[float("nan"), float("nan"), float("nan")], [3.0, float("nan"), 1.0]])])
    mean, advantages = _trl_rewards_and_advantages(scores, rs.weights, rs.names, G=3)
    combined = rs.combine(scores)
    assert torch.isnan(combined[4])  # the unscorable row
    assert torch.nanmean(combined).item() == pytest.approx(mean, abs=1e-6)
    torch.testing.assert_close(group_advantages(combined, 3, scale="none"), advantages, rtol=0, atol=1e-6)
    assert advantages.abs().max() > 0.1
