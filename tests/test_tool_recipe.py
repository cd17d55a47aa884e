"""recipes/tiny_tool_sft.yaml scores what a perfect model would answer as right, on every held-out row.

The recipe's held-out exact calls stay at 0.00 (its header): this guards the score itself, so that the
figure is the model's and not the scoring's (a call longer than eval_max_new_tokens, or one that does not
parse back to its expected arguments, would read 0.00 whatever the model learned)."""

import json
from pathlib import Path

from omegaconf import OmegaConf

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
