"""Our preference pairs against trl 1.16's DPOTrainer tokenization and collation.

The transformers tokenizer is built from the real Mistral v1 SentencePiece file (mistral-common's
`tokenizer.model.v1` copied to a folder as `tokenizer.model`), with `add_bos_token=True` as the
Hub's Mistral tokenizer config sets it, and a Jinja chat template that renders Mistral's v1 [INST]
format: `test_hf_template_is_mistral_v1` checks it gives mistral-common's own ids. trl runs for real:
a DPOTrainer is built on a tiny saved model and its prepared `train_dataset` (prompt_ids, chosen_ids,
rejected_ids) and `data_collator` are read.

Agreement: for conversational rows (explicit prompt or implicit, with system turns, history and
awkward whitespace) trl 1.16 encodes prompt + answer whole through the template and takes the
prompt as the common prefix, which gives exactly our pairs and, collated, exactly our padded batch.

Legitimate differences, shown rather than hidden:
- Standard (string) rows: trl tokenizes the raw text, without any chat template, and appends EOS
  as text; we put the prompt in a user turn. Ours equals trl's conversational result instead.
- A prompt that already holds a rendered template ("<s>[INST] ... [/INST]"): the transformers
  tokenizer adds BOS and also parses the "<s>" text, so trl's sequence starts with two BOS (peer pain
  point 5). Ours keeps text as text: one BOS.
- Tokenizing prompt and answer apart and concatenating (peer pain point 9): with SentencePiece the
  ids at the seam differ from the whole encoding. trl 1.16 avoids it by encoding the whole and cutting
  at the common prefix, which can drop the end of the prompt; we take the boundary from the template.
"""

from __future__ import annotations

import pytest

trl = pytest.importorskip("trl")
import datasets  # noqa: E402
import transformers  # noqa: E402
from mistral_common.protocol.instruct.request import ChatCompletionRequest  # noqa: E402
from mistral_common.protocol.instruct.validator import ValidationMode  # noqa: E402
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer  # noqa: E402

from mistral_train.data.preference import collate_pairs, tokenize_pairs  # noqa: E402
from mistral_train.tokenizer.tokenizer import bundled_tokenizer_path  # noqa: E402
from tests._chat import A, S, U  # noqa: E402
from tests._tokenizers import bundled, with_tokenizer_model  # noqa: E402
from tests.oracle._trl_helpers import canonical  # noqa: E402

# Mistral's v1 [INST] format as a Jinja template: BOS, "[INST] user [/INST]" per user turn (the system
# prompt joins the first one, as mistral-common v1 does), " answer" + EOS per assistant turn.
V1_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set turns = messages[1:] %}{%- else %}{%- set turns = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in turns %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('roles must alternate user/assistant') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system is defined %}{{- '[INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}"
)


EXPLICIT = [
    {"prompt": [U("What colour is the sky?")], "chosen": [A("Blue.")], "rejected": [A("Green, surely.")]},
    {"prompt": [S("You are terse.\nAnswer in one line."), U("Name a fruit."), A("An apple."),
                U("  와 한국어?\n\tcode: `x  = 1`")],
     "chosen": [A("네 🎉\nok")], "rejected": [A(" spaced answer ")]},
    {"prompt": [U("Mixed 日本語, Ελληνικά and Zürich naïve café")], "chosen": [A("Green.  ")],
     "rejected": [A("emoji 🎉🚀 and a family 👩\u200d👩\u200d👧")]},
]
IMPLICIT = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in EXPLICIT]


@pytest.fixture(scope="module")
def ours():
    return bundled("v1")


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    tokenizer = transformers.AutoTokenizer.from_pretrained(with_tokenizer_model(tmp_path_factory.mktemp("tokenizer_v1")))
    tokenizer.chat_template = V1_TEMPLATE
    tokenizer.add_bos_token = True  # as the Hub's Mistral tokenizer_config.json has it
    assert tokenizer("Hi")["input_ids"][0] == tokenizer.bos_token_id
    return tokenizer


@pytest.fixture(scope="module")
def trl_pairs(tmp_path_factory, hf_tokenizer):
    """rows -> (trl's prepared train_dataset as a list, its data collator), from a real DPOTrainer on a
    tiny saved model (its weights play no part: only the data preparation is compared)."""
    folder = tmp_path_factory.mktemp("tiny_mistral")
    config = transformers.MistralConfig(vocab_size=32000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1)
    transformers.MistralForCausalLM(config).save_pretrained(folder)
    args = trl.DPOConfig(output_dir=str(tmp_path_factory.mktemp("dpo")), report_to=[], bf16=False, fp16=False,
                         use_cpu=True, max_length=None, disable_tqdm=True)

    def prepare(rows: list[dict]):
        trainer = trl.DPOTrainer(model=str(folder), args=args, train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=hf_tokenizer)
        return list(trainer.train_dataset), trainer.data_collator

    return prepare


def as_trl(pair) -> dict:
    return {"prompt_ids": pair.prompt_ids, "chosen_ids": pair.chosen_ids, "rejected_ids": pair.rejected_ids}


def test_hf_template_is_mistral_v1(hf_tokenizer):
    """The transformers template gives mistral-common's ids: whole chats (finetuning mode) and prompts."""
    path = str(bundled_tokenizer_path("v1"))
    finetuning, test_mode = MistralTokenizer.from_file(path, mode=ValidationMode.finetuning), MistralTokenizer.v1()
    for row in EXPLICIT:
        for answer in (row["chosen"], row["rejected"]):
            chat = row["prompt"] + answer
            official = finetuning.encode_chat_completion(ChatCompletionRequest(messages=chat)).tokens
            assert hf_tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"] == official
        prompt = test_mode.encode_chat_completion(ChatCompletionRequest(messages=row["prompt"])).tokens
        assert hf_tokenizer.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True,
                                                return_dict=True)["input_ids"] == prompt


@pytest.mark.parametrize("rows", [EXPLICIT, IMPLICIT], ids=["explicit_prompt", "implicit_prompt"])
def test_conversational_pairs_and_padded_batch_equal_trl(ours, hf_tokenizer, trl_pairs, rows):
    theirs, collator = trl_pairs(rows)
    pairs, stats = tokenize_pairs(canonical(rows), ours, 1024)
    assert stats.total().truncated == 0 and len(pairs) == len(rows)
    for pair, ref in zip(pairs, theirs):
        assert as_trl(pair) == {k: ref[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    # trl's collator (pad = EOS, its default without a pad token) against ours: chosen rows, then rejected
    ref = collator(theirs)
    batch = collate_pairs(pairs, pad_id=collator.pad_token_id, packing=False, max_seq_len=1024)
    assert collator.pad_token_id == ours.eos_id
    assert batch["input_ids"].tolist() == ref["input_ids"].tolist()
    assert batch["attention_mask"].tolist() == ref["attention_mask"].tolist()
    assert (batch["labels"] != -100).long().tolist() == ref["completion_mask"].tolist()


def test_standard_strings_trl_skips_the_template(ours, hf_tokenizer, trl_pairs):
    """trl tokenizes string rows as raw text (no [INST], EOS appended as text); ours puts the prompt in
    a user turn, and equals trl's own result for the same row written as messages."""
    row = {"prompt": "What colour is the sky?", "chosen": "Blue.", "rejected": "Green, surely."}
    (standard,), _ = trl_pairs([row])
    (conversational,), _ = trl_pairs([{"prompt": [U(row["prompt"])], "chosen": [A(row["chosen"])],
                                        "rejected": [A(row["rejected"])]}])
    (pair,), _ = tokenize_pairs(canonical([row]), ours, 1024)
    assert standard["prompt_ids"] == hf_tokenizer(row["prompt"])["input_ids"]  # BOS + text, no template
    assert "[INST]" not in hf_tokenizer.decode(standard["prompt_ids"])
    assert as_trl(pair) != {k: standard[k] for k in as_trl(pair)}
    assert as_trl(pair) == {k: conversational[k] for k in as_trl(pair)}
    # raw concatenation glues the answer to the prompt ("sky?Blue."), so even the answer's ids differ
    assert hf_tokenizer.decode(standard["prompt_ids"] + standard["chosen_ids"]) == "<s> What colour is the sky?Blue.</s>"
    assert standard["chosen_ids"] != pair.chosen_ids


def test_a_pretemplated_prompt_gives_trl_two_bos_and_ours_one(ours, hf_tokenizer, trl_pairs):
    """Peer pain point 5: a prompt already rendered with its BOS, as many DPO sets ship them."""
    row = {"prompt": "<s>[INST] Name a colour. [/INST]", "chosen": " Red.", "rejected": " Seven."}
    (theirs,), _ = trl_pairs([row])
    assert theirs["prompt_ids"][:2] == [ours.bos_id, ours.bos_id]
    (pair,), _ = tokenize_pairs(canonical([row]), ours, 1024)
    for which in ("chosen", "rejected"):
        assert pair.sequence(which).input_ids.count(ours.bos_id) == 1


def test_tokenizing_prompt_and_answer_apart_moves_the_boundary(ours, hf_tokenizer, trl_pairs):
    """Peer pain point 9 (trl#2054): tok(prompt) + tok(answer) != tok(prompt + answer) at the seam.
    trl 1.16 encodes the whole and cuts at the common prefix, so the end of its prompt can go missing;
    our boundary comes from the template's turn boundaries, on the whole conversation."""
    row = {"prompt": "The sky is ", "chosen": "blue.", "rejected": "green."}
    prompt_ids = hf_tokenizer(row["prompt"])["input_ids"]
    apart = prompt_ids + hf_tokenizer(row["chosen"] + hf_tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    whole = hf_tokenizer(row["prompt"] + row["chosen"] + hf_tokenizer.eos_token)["input_ids"]
    assert apart != whole
    (theirs,), _ = trl_pairs([row])
    assert theirs["prompt_ids"] + theirs["chosen_ids"] == whole
    assert theirs["prompt_ids"] == prompt_ids[:-1]  # the prompt's trailing "▁" was left out of training
    (pair,), _ = tokenize_pairs(canonical([row]), ours, 1024)
    chat = [U(row["prompt"]), A(row["chosen"])]
    assert pair.sequence("chosen").input_ids == hf_tokenizer.apply_chat_template(
        chat, tokenize=True, return_dict=True)["input_ids"]
    assert pair.prompt_ids == hf_tokenizer.apply_chat_template(
        chat[:1], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
