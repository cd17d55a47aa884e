"""Generate the small English corpus and chat sets bundled for the default CPU demo.

    python scripts/make_bundled_data.py [--out DIR]

Every sentence comes from a template over a tiny invented world (objects with one colour each,
animals with one food and one sound, numbers zero to twenty, days of the week). One fixed seed
drives every choice, so two runs write byte-identical files; no text comes from outside.
Writes tiny_corpus.txt (documents separated by a blank line), tiny_chat.jsonl (train),
tiny_chat_eval.jsonl (held-out facts, each row with an exact "answer"), and preference pairs made
from the same questions: tiny_pairs.jsonl and tiny_pairs_eval.jsonl (held-out facts), whose
"chosen" answer is the true one and "rejected" a wrong one, so a preference is checkably right:
half the time of the same kind (another number, colour, food, sound or day), otherwise of another
kind (a colour for a number question).
"""
from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

SEED = 1234
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "mistral_train" / "resources" / "data"
CORPUS_BYTES = 450_000  # stop adding documents once the corpus is this large

NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
           " fifteen sixteen seventeen eighteen nineteen twenty").split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
COLOURS = "red blue green yellow white black pink brown orange purple".split()
# Plurals of all objects are the word plus "s", which keeps the templates simple.
OBJECTS = ("ball cup hat book car kite bed door chair coat shoe sock bag pen lamp boat bike cake"
           " bell drum rug vase mug plate spoon fork key clock sofa tent flag shirt bottle candle"
           " pillow bucket basket button balloon kettle").split()
ANIMALS = {  # animal: (what it eats, what it says)
    "cat": ("fish", "meow"), "dog": ("meat", "woof"), "cow": ("grass", "moo"),
    "horse": ("hay", "neigh"), "sheep": ("grass", "baa"), "pig": ("corn", "oink"),
    "hen": ("seeds", "cluck"), "duck": ("bread", "quack"), "mouse": ("cheese", "squeak"),
    "frog": ("flies", "croak"), "owl": ("mice", "hoot"), "lion": ("meat", "roar"),
    "snake": ("eggs", "hiss"), "bird": ("worms", "tweet"), "wolf": ("meat", "howl"),
    "bear": ("honey", "growl"), "crow": ("corn", "caw"), "goose": ("grass", "honk"),
}
NAMES = {"Tom": "he", "Mia": "she", "Sam": "he", "Ana": "she", "Ben": "he", "Lily": "she",
         "Max": "he", "Zoe": "she", "Leo": "he", "Eva": "she"}
PRONOUNS = {"he": ("he", "him", "his"), "she": ("she", "her", "her")}
PLACES = ["park", "farm", "garden", "school", "shop", "river"]

# One canonical corpus sentence per kind of fact; every fact appears in this exact form.
STATEMENTS = {
    "plus": "{0} plus {1} is {ans}.", "minus": "{0} minus {1} is {ans}.",
    "colour": "The {0} is {ans}.", "eats": "The {0} eats {ans}.", "says": "The {0} says {ans}.",
    "day_after": "After {0} comes {ans}.", "day_before": "Before {0} comes {ans}.",
    "number_after": "After {0} comes {ans}.", "number_before": "Before {0} comes {ans}.",
}
_DAY_Q = ["What day comes {d} {0}?", "Which day comes {d} {0}?", "What is the day {d} {0}?",
          "Tell me the day {d} {0}."]
_NUM_Q = [q.replace("day", "number") for q in _DAY_Q]
QUESTIONS = {
    "plus": ["What is {0} plus {1}?", "How much is {0} plus {1}?",
             "Can you tell me what {0} plus {1} is?", "{0} plus {1} is what?"],
    "colour": ["What colour is the {0}?", "Which colour is the {0}?",
               "Tell me what colour the {0} is.", "What is the colour of the {0}?"],
    "eats": ["What does the {0} eat?", "What food does the {0} eat?",
             "Tell me what the {0} eats.", "What does the {0} like to eat?"],
    "says": ["What sound does the {0} make?", "What does the {0} say?",
             "Which sound does the {0} make?", "Tell me what the {0} says."],
    "day_after": [q.replace("{d}", "after") for q in _DAY_Q],
    "day_before": [q.replace("{d}", "before") for q in _DAY_Q],
    "number_after": [q.replace("{d}", "after") for q in _NUM_Q],
    "number_before": [q.replace("{d}", "before") for q in _NUM_Q],
}
QUESTIONS["minus"] = [q.replace("plus", "minus") for q in QUESTIONS["plus"]]
# How many facts of each kind are held out for evaluation (about 100 in all).
EVAL_COUNTS = {"plus": 30, "minus": 30, "colour": 10, "eats": 5, "says": 5, "day_after": 2,
               "day_before": 2, "number_after": 8, "number_before": 8}

Fact = tuple[tuple[str, ...], str]  # (subject words, answer)


def cap(text: str) -> str:
    """Upper-case the first letter only ("three plus four" -> "Three plus four")."""
    return text[0].upper() + text[1:]


def article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def count(n: int, noun: str) -> str:
    return f"{NUMBERS[n]} {noun}" + ("" if n == 1 else "s")


def all_facts(colour: dict[str, str]) -> dict[str, list[Fact]]:
    """Every checkable fact of the world, by kind; numbers stay within zero..twenty."""
    n, d = NUMBERS, DAYS
    return {
        "plus": [((n[a], n[b]), n[a + b]) for a in range(21) for b in range(21 - a)],
        "minus": [((n[a], n[b]), n[a - b]) for a in range(21) for b in range(a + 1)],
        "colour": [((o,), colour[o]) for o in OBJECTS],
        "eats": [((a,), food) for a, (food, _) in ANIMALS.items()],
        "says": [((a,), sound) for a, (_, sound) in ANIMALS.items()],
        "day_after": [((d[i],), d[(i + 1) % 7]) for i in range(7)],
        "day_before": [((d[i],), d[i - 1]) for i in range(7)],
        "number_after": [((n[i],), n[i + 1]) for i in range(20)],
        "number_before": [((n[i],), n[i - 1]) for i in range(1, 21)],
    }


def statement(kind: str, fact: Fact) -> str:
    return cap(STATEMENTS[kind].format(*fact[0], ans=fact[1]))


def deck(rng: random.Random, items: Sequence) -> Iterator:
    """Yield items forever, reshuffled each round, so every fact recurs about equally often."""
    while True:
        order = list(items)
        rng.shuffle(order)
        yield from order


@dataclass
class World:
    rng: random.Random
    colour: dict[str, str]
    decks: dict[str, Iterator]

    def draw(self, kind: str):
        return next(self.decks[kind])

    def person(self) -> tuple[str, str, str, str]:
        """A random name with its subject, object and possessive pronouns."""
        name = self.rng.choice(list(NAMES))
        return (name, *PRONOUNS[NAMES[name]])

    def other_than(self, name: str) -> str:
        return self.rng.choice([n for n in NAMES if n != name])


def colour_doc(w: World) -> str:
    out = []
    for _ in range(w.rng.randint(4, 7)):
        o = w.draw("objects")
        c, other = w.colour[o], w.rng.choice([x for x in COLOURS if x != w.colour[o]])
        name = w.person()[0]
        before = w.rng.choice(["", f"Look at the {o}. ", f"Here is {article(c)} {o}. ",
                               f"{name} has {article(o)}. "])
        after = w.rng.choice(["", f" It is not {other}.", f" {name} likes the {c} {o}."])
        out.append(f"{before}The {o} is {c}.{after}")
    return " ".join(out)


def animal_doc(w: World) -> str:
    out = [w.rng.choice(["Here are some animals.", "Let us visit the farm.", "Animals are fun."])]
    for _ in range(w.rng.randint(3, 5)):
        a = w.draw("animals")
        food, sound = ANIMALS[a]
        facts = [f"The {a} eats {food}.", f"The {a} says {sound}."]
        w.rng.shuffle(facts)
        out.append(w.rng.choice(["", f"Here is {article(a)}. "]) + " ".join(facts))
    return " ".join(out)


def statements(w: World, kinds: list[str], low: int, high: int) -> list[str]:
    """Between low and high canonical fact sentences, each of a kind picked from kinds."""
    return [statement(k, w.draw(k)) for k in w.rng.choices(kinds, k=w.rng.randint(low, high))]


def sum_doc(w: World) -> str:
    intro = w.rng.choice(["Let us do some sums.", "Here are some sums.", "Numbers are fun."])
    return " ".join([intro, *statements(w, ["plus", "minus"], 4, 7)])


def count_doc(w: World) -> str:
    a = w.rng.randint(0, 14)
    b = w.rng.randint(a + 3, min(a + 8, 20))
    out = [f"Let us count from {NUMBERS[a]} to {NUMBERS[b]}.",
           cap(", ".join(NUMBERS[a:b + 1])) + "."]
    return " ".join(out + statements(w, ["number_after", "number_before"], 2, 4))


def day_doc(w: World) -> str:
    i = w.rng.randrange(7)
    name = w.person()[0]
    out = [w.rng.choice(["A week has seven days.", "The days of the week are "
                         + ", ".join(DAYS[:-1]) + " and Sunday."]),
           f"Today is {DAYS[i]}. Tomorrow is {DAYS[(i + 1) % 7]}. Yesterday was {DAYS[i - 1]}.",
           f"On {DAYS[i]}, {name} goes to the {w.rng.choice(PLACES)}."]
    return " ".join(out + statements(w, ["day_after", "day_before"], 2, 3))


def gift_story(w: World) -> str:
    name, he, him, _ = w.person()
    other, o = w.other_than(name), w.draw("objects")
    c, place = w.colour[o], w.rng.choice(PLACES)
    return (f"{name} has {article(c)} {o}. {cap(he)} takes the {o} to the {place}. "
            f"At the {place}, {he} meets {other}. {name} gives the {c} {o} to {other}. "
            f"Now {other} has the {o}. The {o} is {c}. {other} says thank you to {him}.")


def farm_story(w: World) -> str:
    name, he, _, his = w.person()
    a1, a2 = w.draw("animals"), w.draw("animals")
    if a1 == a2:
        a2 = "cat" if a1 != "cat" else "dog"
    i = w.rng.randrange(7)
    return (f"On {DAYS[i]}, {name} goes to the farm. {cap(he)} sees {article(a1)} and "
            f"{article(a2)}. The {a1} says {ANIMALS[a1][1]}. The {a2} says {ANIMALS[a2][1]}. "
            f"{name} gives the {a1} some {ANIMALS[a1][0]}. The {a1} eats {ANIMALS[a1][0]}. "
            f"After {DAYS[i]} comes {DAYS[(i + 1) % 7]}. On {DAYS[(i + 1) % 7]}, "
            f"{name} goes back to the farm with {his} friends.")


def count_story(w: World) -> str:
    name, he, him, _ = w.person()
    other, o = w.other_than(name), w.draw("objects")
    n = w.rng.randint(2, 15)
    if w.rng.random() < 0.5:
        m = w.rng.randint(1, 20 - n)
        middle = f"{other} gives {him} {NUMBERS[m]} more."
        fact = statement("plus", ((NUMBERS[n], NUMBERS[m]), NUMBERS[n + m]))
        left = n + m
    else:
        m = w.rng.randint(1, n - 1)
        middle = f"{cap(he)} gives {NUMBERS[m]} to {other}."
        fact = statement("minus", ((NUMBERS[n], NUMBERS[m]), NUMBERS[n - m]))
        left = n - m
    return (f"{name} has {count(n, o)}. {middle} Now {name} has {count(left, o)}. {fact} "
            f"The {o} is {w.colour[o]}.")


DOC_MAKERS = [(colour_doc, 2), (animal_doc, 2), (sum_doc, 3), (count_doc, 1), (day_doc, 1),
              (gift_story, 2), (farm_story, 2), (count_story, 2)]


def make_corpus(rng: random.Random, colour: dict[str, str], facts: dict[str, list[Fact]]) -> str:
    """Unique documents, one paragraph each, until the corpus reaches CORPUS_BYTES."""
    decks = {kind: deck(rng, items) for kind, items in facts.items()}
    decks["objects"], decks["animals"] = deck(rng, OBJECTS), deck(rng, list(ANIMALS))
    world = World(rng, colour, decks)
    makers, weights = zip(*DOC_MAKERS)
    docs, seen, size = [], set(), 0
    while size < CORPUS_BYTES:
        doc = rng.choices(makers, weights)[0](world)
        if doc not in seen:
            seen.add(doc)
            docs.append(doc)
            size += len(doc) + 2
    return "\n\n".join(docs) + "\n"


def chat_row(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": cap(question)},
                         {"role": "assistant", "content": answer}]}


def make_chat(rng: random.Random, facts: dict[str, list[Fact]]) -> tuple[list, list]:
    """Hold out EVAL_COUNTS facts per kind; train asks every other fact in all phrasings."""
    train, held_out = [], []
    for kind, items in facts.items():
        items = list(items)
        rng.shuffle(items)
        k = EVAL_COUNTS[kind]
        for subject, answer in items[:k]:
            question = rng.choice(QUESTIONS[kind]).format(*subject)
            held_out.append({**chat_row(question, answer), "answer": answer})
        for subject, answer in items[k:]:
            train.extend(chat_row(q.format(*subject), answer) for q in QUESTIONS[kind])
    rng.shuffle(train)
    rng.shuffle(held_out)
    return train, held_out


TRAIN_PAIRS = 600  # preference pairs from the first training questions: enough for a CPU DPO demo


OTHER_KIND_SHARE = 0.5  # rejected answers of another kind: the part of the preference a tiny model can generalise


def wrong_answer(rng: random.Random, answer: str) -> str:
    """A wrong answer: half the time another of the same kind as `answer` (a number for a number, a day
    for a day: right only if the fact is known), otherwise one of another kind (a colour for a number:
    wrong whatever the fact, so a preference for the right kind carries over to unseen questions)."""
    foods = sorted({food for food, _ in ANIMALS.values()})
    sounds = sorted({sound for _, sound in ANIMALS.values()})
    pools = [NUMBERS, COLOURS, DAYS, foods, sounds]
    own = next((pool for pool in pools if answer in pool), None)
    if own is None:
        raise ValueError(f"no kind of answer holds {answer!r}")
    if rng.random() < OTHER_KIND_SHARE:
        others = [pool for pool in pools if answer not in pool]
        return rng.choice([x for x in rng.choice(others) if x not in own])
    return rng.choice([x for x in own if x != answer])


def pair_row(row: dict, rng: random.Random) -> dict:
    """A chat row as a preference pair: the true answer chosen, a wrong one rejected."""
    question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
    pair = {"prompt": question, "chosen": answer, "rejected": wrong_answer(rng, answer)}
    return {**pair, "answer": row["answer"]} if "answer" in row else pair


def make_pairs(rng: random.Random, train: list, held_out: list) -> tuple[list, list]:
    return [pair_row(row, rng) for row in train[:TRAIN_PAIRS]], [pair_row(row, rng) for row in held_out]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    out = parser.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    objects = list(OBJECTS)
    rng.shuffle(objects)
    colour = {o: COLOURS[i % len(COLOURS)] for i, o in enumerate(objects)}
    facts = all_facts(colour)
    train, held_out = make_chat(rng, facts)
    corpus = make_corpus(rng, colour, facts)
    # pairs draw from their own generator, so adding them left the earlier files' bytes unchanged
    train_pairs, held_out_pairs = make_pairs(random.Random(SEED + 1), train, held_out)
    texts = {"tiny_corpus.txt": corpus,
             "tiny_chat.jsonl": "".join(json.dumps(row) + "\n" for row in train),
             "tiny_chat_eval.jsonl": "".join(json.dumps(row) + "\n" for row in held_out),
             "tiny_pairs.jsonl": "".join(json.dumps(row) + "\n" for row in train_pairs),
             "tiny_pairs_eval.jsonl": "".join(json.dumps(row) + "\n" for row in held_out_pairs)}
    for name, text in texts.items():
        (out / name).write_text(text, encoding="utf-8", newline="\n")  # same bytes on Windows
        print(f"{out / name}: {len(text.encode())} bytes")


if __name__ == "__main__":
    main()
