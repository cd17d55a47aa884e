"""Write the bundled tiny tool-use data: mistral_train/resources/data/tiny_tools.jsonl (training) and
tiny_tools_eval.jsonl (held out), for recipes/tiny_tool_sft.yaml.

Each row is an OpenAI `messages` row with one `calculator` tool: the user asks for a sum, difference or
product of two numbers in words ("What is 12 plus 7?"), the assistant calls calculator with the expression
("12 + 7"), the tool returns the result, the assistant answers with it ("12 plus 7 is 19."). Held-out rows
stop at the call (what the exact-call score checks) and never share a question's numbers and operation
with a training row. Calls carry no id: the data layer gives each the id of its place (data/tool_rows.py).

    python scripts/make_tiny_tools.py            # rewrites both files (seeded: the same bytes every time)
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Sequence

OUT = Path(__file__).resolve().parents[1] / "mistral_train" / "resources" / "data"
CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
OPERATIONS = {"plus": ("+", lambda a, b: a + b), "minus": ("-", lambda a, b: a - b), "times": ("*", lambda a, b: a * b)}
QUESTIONS = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {op} {b}?")


def tool_row(a: int, op: str, b: int, template: str, held_out: bool) -> dict:
    """One conversation; held out: only the question and the call (the reply the score checks)."""
    symbol, fn = OPERATIONS[op]
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": f"{a} {symbol} {b}"}}}
    messages = [{"role": "user", "content": template.format(a=a, op=op, b=b)},
                {"role": "assistant", "content": None, "tool_calls": [call]}]
    if not held_out:
        messages += [{"role": "tool", "content": str(fn(a, b))},
                     {"role": "assistant", "content": f"{a} {op} {b} is {fn(a, b)}."}]
    return {"messages": messages, "tools": [CALCULATOR]}


def make_tools(rng: random.Random, n_train: int, n_eval: int, high: int = 20) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): every (a, op, b) with 1 <= a, b <= high, shuffled; the first n_eval
    problems are held out, training rows draw from the rest (each problem in up to len(QUESTIONS) phrasings)."""
    problems = [(a, op, b) for a in range(1, high + 1) for op in OPERATIONS for b in range(1, high + 1)]
    rng.shuffle(problems)
    held, rest = problems[:n_eval], problems[n_eval:]
    train = [tool_row(a, op, b, rng.choice(QUESTIONS), False) for a, op, b in
             (rest[i % len(rest)] for i in range(n_train))]
    return train, [tool_row(a, op, b, rng.choice(QUESTIONS), True) for a, op, b in held]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, held = make_tools(random.Random(args.seed), n_train=1000, n_eval=100)
    for name, rows in (("tiny_tools.jsonl", train), ("tiny_tools_eval.jsonl", held)):
        (args.out / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"{args.out / name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
