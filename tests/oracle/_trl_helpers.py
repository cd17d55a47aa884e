"""What the trl trainer oracles (test_dpo_trainer_parity.py, test_reward_trainer_parity.py) share.

Both sides read the SAME token ids: preference rows are tokenized once by our `tokenize_pairs` with
the real Mistral v1 tokenizer, and trl gets those ids as a pre-tokenized dataset. trl only needs a
transformers tokenizer for its pad id (none is set, so it pads with EOS, as our `pad_id_of` does).
`tiny_folder` (a seeded tiny transformers Mistral) and `canonical` are shared with test_sft_trl_parity.py
and test_preference_trl_parity.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import transformers

from mistral_train.data.formats import to_canonical
from mistral_train.data.preference import PreferencePair, tokenize_pairs
from mistral_train.data.sources import bundled_pairs_path
from tests._chat import A, S, U
from tests._tokenizers import bundled, with_tokenizer_model

__all__ = ["TRL_ON_CPU", "ROWS", "canonical", "hf_tokenizer", "our_tokenizer", "pairs_of", "preference_rows",
           "tiny_folder"]

# trl configs default to bf16=True even on CPU (STACK-NOTES): every oracle run is fp32, no reports, no saves.
TRL_ON_CPU = dict(report_to=[], bf16=False, fp16=False, use_cpu=True, seed=0, disable_tqdm=True, save_strategy="no")

# Hand-written pairs whose answers differ in length (1 to ~20 tokens), with a system turn and a multi-turn
# history, and a margin each (reward models read it; DPO drops it).
ROWS = [
    {"prompt": "What is two plus two?", "chosen": "Four.", "rejected": "It is five, I think, or maybe six.",
     "margin": 1.5},
    {"prompt": [S("You are terse."), U("Name a colour of the sky on a clear day.")], "chosen": [A("Blue, mostly.")],
     "rejected": [A("Green.")], "margin": 0.25},
    {"prompt": "Hi", "chosen": "Hello! How can I help you today?", "rejected": "Go away.", "margin": 0.0},
    {"prompt": [U("Name a fruit."), A("An apple."), U("And a vegetable?")], "chosen": [A("A carrot.")],
     "rejected": [A("A banana, which is also a fruit, so that is wrong.")], "margin": 2.0},
    {"prompt": "Spell 'cat' backwards.", "chosen": "tac", "rejected": "The word cat spelled backwards is cat.",
     "margin": -0.5},
    {"prompt": "Is the Earth flat?", "chosen": "No, it is very nearly a sphere.", "rejected": "Yes.",
     "margin": 0.75},
]


def preference_rows(n: int, margins: bool = False) -> list[dict]:
    """`n` canonical rows: ROWS interleaved with the bundled tiny_pairs (short one-word answers)."""
    with open(bundled_pairs_path()) as f:
        bundled = [json.loads(line) for line, _ in zip(f, range(n))]
    mixed, hand = [], iter(ROWS)
    for i in range(n):
        row = next(hand, None) if i % 3 == 0 else None  # every third row a hand-written one, while they last
        row = dict(row if row is not None else bundled.pop(0))
        if not margins:
            row.pop("margin", None)
        elif "margin" not in row:
            row["margin"] = 0.1 * (i % 4)
        mixed.append(row)
    return canonical(mixed)


def tiny_folder(hf_model, tiny, folder):
    """Save a seeded tiny transformers Mistral with the real 32000-token vocabulary to `folder`."""
    hf_model(tiny(vocab_size=32000, hidden_size=64, intermediate_size=128), seed=0).save_pretrained(folder)
    return folder


def canonical(rows: list[dict]) -> list[dict]:
    return [{**to_canonical(r, "preference", {}, f"rows row {i}"), "source": "rows", "row": i} for i, r in enumerate(rows)]


def our_tokenizer():
    return bundled("v1")


def pairs_of(rows: list[dict], max_seq_len: int = 256) -> list[PreferencePair]:
    pairs, stats = tokenize_pairs(rows, our_tokenizer(), max_seq_len)
    assert len(pairs) == len(rows) and stats.total().truncated == 0
    return pairs


def hf_tokenizer(folder: Path, pad_token: Optional[str] = None):
    """The transformers tokenizer of the real v1 SentencePiece model (trl's processing_class)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(with_tokenizer_model(folder))
    assert tokenizer.pad_token is None  # trl falls back to EOS, as our pad_id_of does
    if pad_token is not None:
        tokenizer.pad_token = pad_token
    return tokenizer
