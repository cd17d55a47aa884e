"""The default recipe's fine-tuning tasks: reproducible from their script, right, and truly held out."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from itertools import combinations
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "mistral_train" / "resources" / "data"
FILES = ["tiny_tasks.jsonl", "tiny_tasks_eval.jsonl", "tiny_task_pairs.jsonl", "tiny_task_pairs_eval.jsonl"]
NUMBER_WORDS = "zero one two three four five".split()
PROMPT = re.compile(r"^(First word|Last word|How many words): ((?:\w+ ?)+)$")


def read(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines()]


def solve(prompt: str) -> str:
    """The answer, computed here independently of the generator."""
    match = PROMPT.match(prompt)
    assert match, prompt
    words = match.group(2).split()
    return {"First word": words[0], "Last word": words[-1], "How many words": NUMBER_WORDS[len(words)]}[match.group(1)]


def lists(rows: list[dict], key=lambda r: r["messages"][0]["content"]) -> list[list[str]]:
    return [PROMPT.match(key(r)).group(2).split() for r in rows]


def test_regenerating_gives_identical_bytes(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("make_tiny_tasks", ROOT / "scripts" / "make_tiny_tasks.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    module.main(["--out", str(tmp_path)])
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


@pytest.mark.parametrize("name", ["tiny_tasks.jsonl", "tiny_tasks_eval.jsonl"])
def test_every_answer_is_right(name):
    rows = read(name)
    for row in rows:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert assistant["content"] == solve(user["content"])
        if name.endswith("_eval.jsonl"):
            assert row["answer"] == assistant["content"]
    kinds = {PROMPT.match(r["messages"][0]["content"]).group(1) for r in rows}
    assert kinds == {"First word", "Last word", "How many words"}


def test_no_two_words_of_a_held_out_list_stand_together_in_training():
    held = {frozenset(pair) for words in lists(read("tiny_tasks_eval.jsonl")) for pair in combinations(words, 2)}
    training = lists(read("tiny_tasks.jsonl")) + lists(read("tiny_task_pairs.jsonl"), key=lambda r: r["prompt"])
    shared = [words for words in training if any(frozenset(p) in held for p in combinations(words, 2))]
    assert not shared, shared[:3]
    assert len(held) > 100  # the check has something to find


@pytest.mark.parametrize("name", ["tiny_task_pairs.jsonl", "tiny_task_pairs_eval.jsonl"])
def test_pairs_choose_the_right_answer_and_reject_a_wrong_one(name):
    for row in read(name):
        assert row["chosen"] == solve(row["prompt"]) != row["rejected"]
