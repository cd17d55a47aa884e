"""Tekken text tokenization speed: ours (tiktoken, one thread and cut into parts on threads) against
mistral-common's Tekkenizer and HF tokenizers (the tokenizer.json transformers converts from the same
tekken file), on a large text built here from a fixed mix (English, Korean, code, emoji, numbers).
Every side's ids are checked equal before the times are kept.

    .venv/bin/python scripts/bench_tokenizer.py --mb 50
"""

from __future__ import annotations

import argparse
import platform
import random
import re
import time
from importlib import resources
from pathlib import Path

import torch

from mistral_train.tokenizer.tekken import Tekken

PARAGRAPHS = [
    "The quick brown fox jumps over the lazy dog while 12,345 people watch on March 3rd, 2024.",
    "안녕하세요, 세계! 오늘 날씨가 정말 좋네요. 한국어 형태소 분석은 어렵습니다.",
    "def tokenize(text: str) -> list[int]:\n    return [ord(c) for c in text if c.isalnum()]\n",
    "Emoji 🎉🚀 and families 👩‍👩‍👧, flags 🇰🇷🇫🇷, and math ∑ x² = 42.",
    "Mixed 日本語のテキスト, Ελληνικά, العربية, Zürich naïve café — end.",
    "    indented\tlines   with   runs   of   spaces\n\n\n",
]


def make_text(megabytes: float, seed: int = 0) -> str:
    rng, parts, size = random.Random(seed), [], 0
    while size < megabytes * 1e6:
        para = "\n".join(rng.choice(PARAGRAPHS) for _ in range(8)) + "\n"
        parts.append(para)
        size += len(para.encode("utf-8"))
    return "".join(parts)


def timed(fn, repeat: int) -> tuple[float, list[int]]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=50.0, help="text size in MB (UTF-8)")
    parser.add_argument("--repeat", type=int, default=2, help="best of N runs")
    args = parser.parse_args()
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    from transformers.integrations.mistral.tokenizer import MistralConverter

    path = Path(str(resources.files("mistral_common") / "data" / "tekken_240911.json"))
    text = make_text(args.mb)
    mbytes = len(text.encode("utf-8")) / 1e6
    ours, ours_1 = Tekken(path, threads=torch.get_num_threads()), Tekken(path, threads=1)
    reference = Tekkenizer.from_file(path)
    hf = MistralConverter(str(path)).converted()
    # HF encodes a batch (its parallel path) of pieces cut where Tekken's regex always cuts (a line
    # break before a letter), so the ids are those of the whole text
    lines = re.split(r"(?<=\n)(?=[A-Za-z])", text)

    def hf_ids() -> list[int]:
        return [i for enc in hf.encode_batch(lines, add_special_tokens=False) for i in enc.ids]

    sides = {
        "mistral-common Tekkenizer (tiktoken, 1 thread)": lambda: reference.encode(text, bos=False, eos=False),
        "HF tokenizers encode_batch over lines (all threads)": hf_ids,
        "ours, tiktoken, 1 thread": lambda: ours_1.encode(text),
        f"ours, tiktoken, parts on {torch.get_num_threads()} threads": lambda: ours.encode(text),
    }
    results, expected = {}, None
    for name, fn in sides.items():
        seconds, ids = timed(fn, args.repeat)
        expected = ids if expected is None else expected
        if ids != expected:
            raise SystemExit(f"{name}: ids differ from mistral-common's")
        results[name] = seconds
    fastest_other = min(s for n, s in results.items() if not n.startswith("ours"))
    print(f"Text: {mbytes:.1f} MB, {len(expected):,} tokens; CPU: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; best of {args.repeat}; every side's ids equal mistral-common's\n")
    print("| side | seconds | MB/s | vs fastest other |\n|---|---|---|---|")
    for name, seconds in results.items():
        print(f"| {name} | {seconds:.2f} | {mbytes / seconds:.1f} | {fastest_other / seconds:.2f}x |")


if __name__ == "__main__":
    main()
