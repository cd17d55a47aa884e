"""recipes/tiny_tool_sft.yaml: a fresh tiny model learns to call the calculator with the right arguments on
held-out questions, and the score it is judged by reads a perfect answer as right on every held-out row (so the
figure is the model's and not the scoring's: a call longer than eval_max_new_tokens, or one that did not parse
back to its expected arguments, would read 0.00 whatever the model learned)."""

import json
from pathlib import Path

from omegaconf import OmegaConf

from mistral_train.cli import main
from mistral_train.data.formats import to_canonical
from mistral_train.data.sft import assistant_spans
from mistral_train.train.evaluate import _predicted_calls, expected_calls
from tests._tokenizers import bundled

ROOT = Path(__file__).resolve().parents[1]
RECIPE = OmegaConf.load(ROOT / "recipes" / "tiny_tool_sft.yaml")
EVAL = ROOT / "mistral_train" / "resources" / "data" / "tiny_tools_eval.jsonl"


def test_every_held_out_call_fits_the_recipes_budget_and_parses_back_to_its_expected_arguments():
    assert RECIPE.model.tokenizer == "bundled:v3"
    tokenizer = bundled("v3")
    budget = RECIPE.trainer.eval_max_new_tokens
    lines = EVAL.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 100
    for n, line in enumerate(lines, 1):
        row = to_canonical(json.loads(line), "messages", {}, f"tiny_tools_eval.jsonl line {n}")
        ids, mask = tokenizer.encode_chat(row["messages"], tools=row["tools"])
        start, end = assistant_spans(mask)[-1]
        answer = ids[start:end]  # [TOOL_CALLS][{"name": ..., "arguments": ..., "id": ...}]</s>
        assert answer[-1] == tokenizer.eos_id and len(answer) <= budget, f"line {n}: {len(answer)} tokens"
        assert _predicted_calls(tokenizer, answer, None) == expected_calls(row), f"line {n}"
        assert _predicted_calls(tokenizer, answer[:-3], None) is None  # cut inside the JSON: no call


def test_the_recipe_as_shipped_raises_held_out_exact_calls_from_none_to_most(tmp_path):
    # The recipe's own settings (300 steps of 16 conversations), evaluated before training and at the end on the
    # 100 held-out questions, whose (a, operation, b) never appear in training: a right call copies the
    # question's numbers into the expression and maps the operation word to its sign.
    assert main(["recipe=tiny_tool_sft", f"run.dir={tmp_path}", "tracking.progress_bar=false", "tracking.plot=false",
                 "trainer.eval_every=null"]) == 0
    lines = (tmp_path / "tiny_tool_sft" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    scored = [row for row in map(json.loads, lines) if "exact_match" in row]
    before, after = scored[0], scored[-1]
    assert (before["step"], after["step"]) == (0, RECIPE.trainer.max_steps)
    assert before["exact_match"] == 0.0 and after["exact_match"] >= 0.5, (before, after)
