"""Generate the word-list tasks of the default CPU recipe's fine-tuning stage: skills a tiny Mistral learns in minutes.

    python scripts/make_tiny_tasks.py [--out DIR]

Each task takes a list of 2 to 4 common words (each one token of Mistral's v1 tokenizer) and answers with
one word: the list's first word, its last word, or how many words it has. A list the model has never seen
can only be answered by doing the task (pointing at the right word, counting), so held-out exact match
measures a learned skill, not memorised facts. Held out: 102 lists whose words, in any order, never stand
next to one another in any training list (chat rows or pairs).

Files (one fixed seed drives every choice: two runs write byte-identical files; no outside text):
- tiny_tasks.jsonl        chat rows {"messages": [user, assistant]} for SFT.
- tiny_tasks_eval.jsonl   the held-out rows, each with its exact "answer".
- tiny_task_pairs.jsonl, tiny_task_pairs_eval.jsonl  preference pairs: "chosen" is the right answer,
                          "rejected" the mistake a half-trained model makes (the other end of the list, a
                          neighbouring count); eval pairs add "answer".
Pretraining keeps the bundled English corpus (tiny_corpus.txt, scripts/make_bundled_data.py).
"""
from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Iterator, Sequence
from itertools import combinations
from pathlib import Path

SEED = 2027
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "mistral_train" / "resources" / "data"

# Each word is a single token of the v1 tokenizer ("▁cat"), so copying a word is copying one token.
WORDS = ("cat dog cow pig hen rat sun moon star sky sea rain snow tree leaf rose lake hill road ship"
         " boat car bus door bell book pen cup hat key box egg milk tea cake fish bird duck lion bear").split()
LENGTHS = (2, 3, 4)  # words per list
Words = tuple[str, ...]
NUMBER_WORDS = "zero one two three four five".split()

# kind: (prompt template, answer as a function of the list)
TASKS: dict[str, tuple[str, Callable[[Words], Words]]] = {
    "count": ("How many words: {}", lambda ws: (NUMBER_WORDS[len(ws)],)),
    "first": ("First word: {}", lambda ws: ws[:1]),
    "last": ("Last word: {}", lambda ws: ws[-1:]),
}
TRAIN_PER_TASK = 1000
EVAL_PER_TASK = 34
PAIRS_PER_TASK = 150


def task_prompt(kind: str, words: Words) -> str:
    return TASKS[kind][0].format(" ".join(words))


def task_answer(kind: str, words: Words) -> str:
    return " ".join(TASKS[kind][1](words))


def wrong_answer(kind: str, words: Words, rng: random.Random) -> str:
    """A plausible mistake: the other end of the list, or a neighbouring count."""
    right = task_answer(kind, words)
    if kind == "first":
        candidates = [words[-1], *words[1:-1]]
    elif kind == "last":
        candidates = [words[0], *words[1:-1]]
    elif kind == "count":
        candidates = [NUMBER_WORDS[len(words) + 1], NUMBER_WORDS[len(words) - 1]]
    else:
        swapped = list(words)
        i = rng.randrange(len(words) - 1)
        swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
        other = words if kind == "reverse" else words[::-1]
        candidates = [" ".join(other), " ".join(swapped)]
    candidates = [c for c in candidates if c != right]
    return candidates[0] if kind in ("first", "last") or rng.random() < 0.5 else candidates[-1]


def word_sets(words: Sequence[str]) -> Iterator[frozenset[str]]:
    """Every set of 2 or more of the list's words: what a training list must not share with a held-out
    one, so that no held-out words stand side by side in training in any order (a rejected answer
    reorders its list)."""
    for size in range(2, len(words) + 1):
        yield from map(frozenset, combinations(words, size))


class Lists:
    """Random word lists (distinct words); lists touching a held-out set are never drawn for training."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.held_out: set[frozenset[str]] = set()

    def draw(self, length: int) -> Words:
        while True:
            words = tuple(self.rng.sample(WORDS, length))
            if not any(s in self.held_out for s in word_sets(words)):
                return words

    def hold_out(self, length: int) -> Words:
        """A list that shares no two words with earlier held-out lists."""
        while True:
            words = tuple(self.rng.sample(WORDS, length))
            if not any(s in self.held_out for s in word_sets(words)):
                self.held_out.update(word_sets(words))
                return words


def chat_row(kind: str, words: Words, answer: bool = False) -> dict:
    reply = task_answer(kind, words)
    row = {"messages": [{"role": "user", "content": task_prompt(kind, words)},
                        {"role": "assistant", "content": reply}]}
    return {**row, "answer": reply} if answer else row


def pair_row(kind: str, words: Words, rng: random.Random, answer: bool = False) -> dict:
    row = {"prompt": task_prompt(kind, words), "chosen": task_answer(kind, words),
           "rejected": wrong_answer(kind, words, rng)}
    return {**row, "answer": row["chosen"]} if answer else row


def build(seed: int = SEED) -> dict[str, list]:
    """Every file's rows, drawn in a fixed order from one seed."""
    rng = random.Random(seed)
    lists = Lists(rng)
    evals = [(kind, lists.hold_out(LENGTHS[i % len(LENGTHS)]))
             for kind in TASKS for i in range(EVAL_PER_TASK)]
    rng.shuffle(evals)
    train = [(kind, lists.draw(rng.choice(LENGTHS))) for kind in TASKS for _ in range(TRAIN_PER_TASK)]
    rng.shuffle(train)
    pair_rng = random.Random(seed + 1)  # its own stream: the chat rows do not change with the pairs
    pairs = train[: PAIRS_PER_TASK * len(TASKS)]
    return {
        "tiny_tasks.jsonl": [chat_row(kind, words) for kind, words in train],
        "tiny_tasks_eval.jsonl": [chat_row(kind, words, answer=True) for kind, words in evals],
        "tiny_task_pairs.jsonl": [pair_row(kind, words, pair_rng) for kind, words in pairs],
        "tiny_task_pairs_eval.jsonl": [pair_row(kind, words, pair_rng, answer=True) for kind, words in evals],
    }


def write(out: Path, seed: int = SEED) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in build(seed).items():
        (out / name).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=SEED, help="only to try other draws; the bundled files use SEED")
    args = parser.parse_args(argv)
    write(args.out, args.seed)
    print(f"wrote the bundled data into {args.out}")


if __name__ == "__main__":
    main()
