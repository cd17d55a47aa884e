"""Write the bundled prompts for online RL (grpo, rloo) from the bundled chat data.

    python scripts/make_tiny_prompts.py [--out DIR]

Each chat row of tiny_chat.jsonl (tiny_chat_eval.jsonl) is one user question and one assistant reply
(scripts/make_bundled_data.py); its prompt file row keeps the question as `prompt` and the reply as
`answer` (format prompt_only), so an exact-answer reward can score completions and held-out exact match
scores the policy on the same 100 facts as SFT. Rows keep the chat files' order: the output is a pure
function of them (byte-identical on every run; tests/data/test_prompt_rows.py checks the bundled files).

- tiny_prompts.jsonl       {"prompt": question, "answer": reply}, one per training chat row
- tiny_prompts_eval.jsonl  the same from the held-out chat rows
- tiny_task_prompts.jsonl, tiny_task_prompts_eval.jsonl  the same from the word-list task rows
  (tiny_tasks*.jsonl; one-word answers: first word, last word, word count), read by recipes/tiny_grpo.yaml
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "mistral_train" / "resources" / "data"
FILES = {"tiny_chat.jsonl": "tiny_prompts.jsonl", "tiny_chat_eval.jsonl": "tiny_prompts_eval.jsonl",
         # the default recipe's word-list tasks (scripts/make_tiny_tasks.py): recipes/tiny_grpo.yaml's prompts
         "tiny_tasks.jsonl": "tiny_task_prompts.jsonl", "tiny_tasks_eval.jsonl": "tiny_task_prompts_eval.jsonl"}


def prompt_row(chat_row: dict, where: str) -> dict[str, str]:
    """{"prompt": the user question, "answer": the assistant reply} of a [user, assistant] chat row."""
    roles = [m["role"] for m in chat_row["messages"]]
    if roles != ["user", "assistant"]:
        raise ValueError(f"{where}: expected one user turn and one assistant reply, got roles {roles}")
    question, reply = (m["content"] for m in chat_row["messages"])
    return {"prompt": question, "answer": reply}


def render(chat_path: Path) -> str:
    """The prompt file's text for one chat file: one JSON object per line."""
    lines = chat_path.read_text(encoding="utf-8").splitlines()
    rows = [prompt_row(json.loads(line), f"{chat_path} line {i}") for i, line in enumerate(lines, 1) if line.strip()]
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DATA, help="folder to write into (default: the package's data)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for chat, prompts in FILES.items():
        text = render(DATA / chat)
        (args.out / prompts).write_text(text, encoding="utf-8")
        print(f"{args.out / prompts}: {text.count(chr(10))} rows")


if __name__ == "__main__":
    main()
