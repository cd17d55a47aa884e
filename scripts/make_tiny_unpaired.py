"""Write the bundled unpaired preferences (KTO) from the bundled preference pairs.

    python scripts/make_tiny_unpaired.py [--out DIR]

Pair i of tiny_pairs.jsonl (tiny_pairs_eval.jsonl) gives ONE unpaired row (format unpaired): its chosen
answer labelled desirable when i is even, its rejected answer labelled undesirable when i is odd. So no prompt
appears with both of its answers (the data is truly unpaired, as KTO is meant for), the two labels are
balanced (desirable_weight = undesirable_weight = 1 is then trl's recommended setting), and the rejected
answers keep their mix of wrong kinds (another number, or a colour for a number). Held-out rows keep the
pair's `answer`, so held-out exact match scores greedy replies on the same facts as tiny_dpo. Rows keep
the pairs' order: the output is a pure function of them (tests/data/test_unpaired.py checks the bundled files).

- tiny_unpaired.jsonl       {"prompt", "completion", "label"}, one per training pair
- tiny_unpaired_eval.jsonl  the same from the held-out pairs, + "answer"
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "mistral_train" / "resources" / "data"
FILES = {"tiny_pairs.jsonl": "tiny_unpaired.jsonl", "tiny_pairs_eval.jsonl": "tiny_unpaired_eval.jsonl"}


def unpaired_row(pair: dict, index: int) -> dict:
    """Pair `index` (from 0) as one unpaired row: the chosen answer (desirable) at even indices, else the
    rejected one (undesirable); an "answer" field is kept."""
    desirable = index % 2 == 0
    row = {"prompt": pair["prompt"], "completion": pair["chosen" if desirable else "rejected"], "label": desirable}
    if "answer" in pair:
        row["answer"] = pair["answer"]
    return row


def render(pairs_path: Path) -> str:
    """The unpaired file's text for one pairs file: one JSON object per line."""
    lines = [line for line in pairs_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [unpaired_row(json.loads(line), i) for i, line in enumerate(lines)]
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA, help="folder to write the two files to")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    for source, target in FILES.items():
        (out / target).write_text(render(DATA / source), encoding="utf-8")
        print(f"wrote {out / target}")


if __name__ == "__main__":
    main()
