"""The bundled demo data: reproducible from its script, well-formed, and internally consistent."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "mistral_train" / "resources" / "data"
FILES = ["tiny_corpus.txt", "tiny_chat.jsonl", "tiny_chat_eval.jsonl", "tiny_pairs.jsonl", "tiny_pairs_eval.jsonl"]
NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
           " fifteen sixteen seventeen eighteen nineteen twenty").split()
# Each chat question names one fact; these patterns pull out (kind, subject) so that train and
# eval can be compared by fact, not only by wording.
QUESTION_KINDS = {
    "arith": r"\b(\w+) (plus|minus) (\w+)\b",
    "colour": r"\bcolour (?:is |of )?the (\w+)\b",
    "eats": r"\bthe (\w+) (?:like to )?eats?\b",
    "says": r"\bthe (\w+) (?:make|says?)\b",
    "day": r"\bday (?:comes )?(after|before) (\w+)\b",
    "number": r"\bnumber (?:comes )?(after|before) (\w+)\b",
}


def load_script(monkeypatch):
    spec = importlib.util.spec_from_file_location("make_bundled_data",
                                                  ROOT / "scripts" / "make_bundled_data.py")
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the module up in sys.modules while the script is executed
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def read_jsonl(name: str) -> list[dict]:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def corpus() -> str:
    return (DATA / "tiny_corpus.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def sentences(corpus: str) -> set[str]:
    return set(re.split(r"(?<=[.!?])\s+", corpus.strip()))


def fact_of(question: str) -> tuple[str, ...]:
    """(kind, subject words...) of a chat question; it must match exactly one kind."""
    found = [(kind, *m.groups()) for kind, pattern in QUESTION_KINDS.items()
             for m in [re.search(pattern, question, re.IGNORECASE)] if m]
    assert len(found) == 1, f"question {question!r} should name one fact, matched {found}"
    return tuple(word.lower() for word in found[0])


def test_regenerating_gives_identical_bytes(tmp_path, monkeypatch):
    load_script(monkeypatch).main(["--out", str(tmp_path)])
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), (
            f"{DATA / name} differs from a fresh run of scripts/make_bundled_data.py")


def test_corpus_size_and_documents(corpus):
    assert 300_000 <= len(corpus.encode("utf-8")) <= 600_000
    assert corpus.isascii() and corpus.endswith("\n") and "\n\n\n" not in corpus
    docs = corpus.strip().split("\n\n")
    assert len(docs) > 1000
    assert all(doc.strip() and "\n" not in doc for doc in docs)
    assert len(set(docs)) == len(docs), "duplicate documents"
    assert len(set(re.findall(r"[a-z]+", corpus.lower()))) < 400, "vocabulary should stay small"


def test_corpus_world_is_consistent(corpus):
    values: dict[tuple[str, str], set[str]] = {}
    for subject, verb, value in re.findall(r"\bThe (\w+) (is|eats|says) (\w+)\.", corpus):
        values.setdefault((subject, verb), set()).add(value)
    assert len(values) > 50
    contradictions = {k: v for k, v in values.items() if len(v) > 1}
    assert not contradictions, f"corpus states several values for {contradictions}"
    sums = re.findall(r"\b(\w+) (plus|minus) (\w+) is (\w+)\.", corpus, re.IGNORECASE)
    assert len(sums) > 1000
    for a, op, b, result in sums:
        a, b, result = (NUMBERS.index(w.lower()) for w in (a, b, result))
        assert result == (a + b if op == "plus" else a - b), f"wrong sum {a} {op} {b} = {result}"


@pytest.mark.parametrize("name, low, high", [("tiny_chat.jsonl", 1500, 2500),
                                             ("tiny_chat_eval.jsonl", 80, 150)])
def test_chat_schema(name, low, high):
    rows = read_jsonl(name)
    assert low <= len(rows) <= high
    keys = {"messages", "answer"} if "eval" in name else {"messages"}
    for i, row in enumerate(rows):
        where = f"{name} row {i}"
        assert set(row) == keys, where
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"], where
        assert all(set(m) == {"role", "content"} for m in row["messages"]), where
        assert all(isinstance(m["content"], str) and m["content"].strip()
                   for m in row["messages"]), where
        answer = row["messages"][1]["content"]
        assert len(answer.split()) == 1, f"{where}: answer {answer!r} should be one word"
        if "answer" in keys:
            assert row["answer"] == answer, where


def test_eval_facts_are_held_out_from_train():
    train = read_jsonl("tiny_chat.jsonl")
    held_out = read_jsonl("tiny_chat_eval.jsonl")
    train_q = {r["messages"][0]["content"] for r in train}
    eval_q = [r["messages"][0]["content"] for r in held_out]
    assert not train_q & set(eval_q) and len(set(eval_q)) == len(eval_q)
    train_facts = {fact_of(q) for q in train_q}
    eval_facts = {fact_of(q) for q in eval_q}
    assert len(eval_facts) == len(eval_q)
    assert not train_facts & eval_facts, f"facts asked in both: {train_facts & eval_facts}"
    # every kind of question is both trained and evaluated
    assert {f[0] for f in train_facts} == {f[0] for f in eval_facts} == set(QUESTION_KINDS)


@pytest.mark.parametrize("name", ["tiny_chat.jsonl", "tiny_chat_eval.jsonl"])
def test_chat_answers_are_right_and_stated_in_corpus(name, sentences):
    for i, row in enumerate(read_jsonl(name)):
        question, answer = (m["content"] for m in row["messages"])
        kind, *subject = fact_of(question)
        if kind == "arith":
            a, op, b = subject
            a, b = NUMBERS.index(a), NUMBERS.index(b)
            assert answer == NUMBERS[a + b if op == "plus" else a - b], f"{name} row {i}"
            stated = f"{subject[0]} {op} {subject[2]} is {answer}.".capitalize()
        elif kind in ("colour", "eats", "says"):
            verb = {"colour": "is", "eats": "eats", "says": "says"}[kind]
            stated = f"The {subject[0]} {verb} {answer}."
        else:
            when, what = subject
            what = what.capitalize() if kind == "day" else what
            stated = f"{when.capitalize()} {what} comes {answer}."
        assert stated in sentences, f"{name} row {i}: corpus never says {stated!r}"


@pytest.mark.parametrize("pairs, chats", [("tiny_pairs.jsonl", "tiny_chat.jsonl"), ("tiny_pairs_eval.jsonl", "tiny_chat_eval.jsonl")])
def test_pairs_prefer_the_true_answer_over_a_wrong_one_of_its_kind_or_of_another(pairs, chats):
    truth = {row["messages"][0]["content"]: row["messages"][1]["content"] for row in read_jsonl(chats)}
    rows = read_jsonl(pairs)
    assert len(rows) == (600 if pairs == "tiny_pairs.jsonl" else 100)
    kinds = [set(NUMBERS), set("red blue green yellow white black pink brown orange purple".split()),
             set("Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split())]
    same, other = 0, 0
    for row in rows:
        assert row["chosen"] == truth[row["prompt"]] != row["rejected"]
        kind = next((k for k in kinds if row["chosen"] in k), None)
        if kind is not None:  # numbers, colours, days (foods and sounds are not listed here)
            same += row["rejected"] in kind  # a number for a number, a day for a day
            other += row["rejected"] not in kind
        assert ("answer" in row) == (pairs == "tiny_pairs_eval.jsonl")
    # both kinds of wrong answer, about half each
    assert 0.3 < same / (same + other) < 0.7
