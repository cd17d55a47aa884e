"""Prompts for online RL (grpo, rloo): format prompt_only, auto-detection, prompt batches (left padding, the chat
template's generation prompt checked against mistral-common, row_index), the group-size rule, small data in
prompts, exact resume, held-out prompts scored by exact match, and the bundled prompt files."""

from __future__ import annotations

import importlib.util
import json
from itertools import islice
from pathlib import Path

import pytest
import torch
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral_train.config import DataSpec, RunConfig, TrainerSpec
from mistral_train.data.batches import build_batches
from mistral_train.data.epochs import SmallDataError
from mistral_train.data.formats import detect_format, format_kind, to_canonical
from mistral_train.data.prompt_batches import encode_prompt
from mistral_train.data.sources import bundled_chat_path, bundled_prompts_path, load_splits
from mistral_train.data.spec import Batching
from mistral_train.errors import ConfigError
from mistral_train.train import evaluate
from mistral_train.train.objectives import OBJECTIVES, ObjectiveEntry
from mistral_train.train.run_data import read_data
from tests._chat import A, S, U
from tests._tokenizers import bundled

WHERE = "prompts.jsonl line 3"
ROOT = Path(__file__).resolve().parents[2]
PAD = 0  # v3's <unk>: anything but a prompt's first id (BOS), so padding is visible
AREA = {"name": "calculate_area", "description": "Area of a shape",
        "parameters": {"type": "object", "properties": {"shape": {"type": "string"}}, "required": ["shape"]}}
TOOL = {"type": "function", "function": AREA}
CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "a1b2c3d4e", "type": "function", "function": {"name": "calculate_area", "arguments": '{"shape": "square"}'}}]}
RESULT = {"role": "tool", "tool_call_id": "a1b2c3d4e", "content": '{"area": 49}'}


@pytest.fixture(scope="module")
def v3():
    return bundled("v3")


# --- format prompt_only -------------------------------------------------------------------------------------

def test_string_prompt_is_one_user_turn_and_every_other_field_is_kept():
    row = {"prompt": "What is two plus two?", "answer": "four", "difficulty": 3, "tags": ["sum"]}
    assert to_canonical(row, "prompt_only", {}, WHERE) == {
        "prompt": [U("What is two plus two?")], "answer": "four", "prompt_text": "What is two plus two?",
        "fields": {"answer": "four", "difficulty": 3, "tags": ["sum"]}}  # as trl passes columns to reward functions


def test_message_list_prompt_keeps_its_turns_and_renamed_fields_keep_their_file_names():
    row = {"question": [S("Be brief."), U("Name a fruit."), A("An apple."), U("And a vegetable?")], "gold": "carrot"}
    out = to_canonical(row, "prompt_only", {"prompt": "question", "answer": "gold"}, WHERE)
    assert out == {"prompt": row["question"], "answer": "carrot", "fields": {"gold": "carrot"}}


def test_tool_rows_keep_tools_and_calls_as_chat_rows_do():
    row = {"tools": [TOOL], "prompt": [U("Area of a square of side 7?"), CALL, RESULT]}
    chat = to_canonical({"tools": [TOOL], "messages": row["prompt"] + [A("49.")]}, "messages", {}, WHERE)
    out = to_canonical(row, "prompt_only", {}, WHERE)
    assert out["prompt"] == chat["messages"][:-1] and out["tools"] == chat["tools"] == [TOOL]
    assert out["prompt"][-1]["name"] == "calculate_area"  # the result linked to its call, as in chat rows


@pytest.mark.parametrize("row, says", [
    ({"prompt": "  "}, "field 'prompt' is empty"),
    ({"prompt": []}, "'prompt' holds no turns"),
    ({"prompt": [U("Hi"), A("Hello")]}, "'prompt' ends with role 'assistant'"),
    ({"prompt": [A("Hello"), U("Hi")]}, "prompt[0] has role 'assistant' where 'user' was expected"),
    ({"prompt": [U("Hi"), U("Again")]}, "prompt[1] has role 'user' where 'assistant' was expected"),
    ({"prompt": [{"role": "robot", "content": "Hi"}]}, "prompt[0] has unknown role 'robot'"),
    ({"prompt": 7}, "field 'prompt' must be a string or list, got int"),
    ({"prompt": "Hi", "answer": 4}, "field 'answer' must be a string, got int"),
    ({"prompt": "Hi", "tools": [{"name": 3}]}, "field 'tools'"),
    ({"question": "Hi"}, "missing field 'prompt' (format prompt_only expects"),
])
def test_bad_prompt_rows_are_one_line_naming_the_row(row, says):
    with pytest.raises(ValueError) as err:
        to_canonical(row, "prompt_only", {}, WHERE)
    message = str(err.value)
    assert message.startswith(f"{WHERE}: ") and says in message and "\n" not in message


def test_auto_reads_a_prompt_without_an_answer_turn_as_prompt_only():
    assert detect_format({"prompt": "Hi"}) == "prompt_only"
    assert detect_format({"prompt": [U("Hi")], "answer": "x", "solution": "y"}) == "prompt_only"
    assert detect_format({"q": "Hi"}, {"prompt": "q"}) == "prompt_only"
    assert detect_format({"prompt": "Hi", "completion": "Hello"}) == "prompt_completion"  # a completion: SFT
    assert detect_format({"prompt": "Hi", "chosen": "a", "rejected": "b"}) == "preference"
    assert format_kind("prompt_only") == "prompt" and format_kind("prompt_completion") == "chat"


# --- prompt batches -----------------------------------------------------------------------------------------

ROWS = [{"prompt": "What is two plus two?", "answer": "four"},
        {"prompt": [S("Answer in one word."), U("Name a fruit."), A("An apple."), U("And a vegetable?")],
         "answer": "carrot", "level": 2},
        {"prompt": "Hi", "answer": "hello"},
        {"prompt": [U("Area of a square of side 7?"), CALL, RESULT], "tools": [TOOL], "answer": "49"},
        {"prompt": "Which colour is the ball in the garden behind the old red house?", "answer": "brown"},
        {"prompt": "Count: cat dog", "answer": "two"}]


def write_rows(folder: Path, rows=ROWS, name="prompts.jsonl") -> Path:
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prompt_batches(path, tokenizer, batch_size=4, group_size=2, max_seq_len=256, seed=5, eval_path=None):
    spec = DataSpec(path=str(path), format="auto", eval_path=None if eval_path is None else str(eval_path))
    train, held = load_splits(spec, seed)
    return build_batches(spec, Batching(False, max_seq_len, PAD, batch_size, seed, group_size=group_size), tokenizer,
                         train, held)


def reference_prompt(row: dict) -> list[int]:
    """mistral-common's v3 generation prompt for a raw row: a request that ends with the user turn (or results)."""
    messages = [U(row["prompt"])] if isinstance(row["prompt"], str) else row["prompt"]
    request = ChatCompletionRequest.from_openai(messages=messages, tools=row.get("tools"))
    return MistralTokenizer.v3().encode_chat_completion(request).tokens


def test_prompt_batches_are_left_padded_generation_prompts_of_their_rows(tmp_path, v3):
    data = prompt_batches(write_rows(tmp_path), v3)
    assert data.eval_batches is None and data.eval_rows is None
    assert [r["fields"].get("level") for r in data.prompt_rows] == [None, 2, None, None, None, None]
    seen = set()
    for batch in islice(data.train, 6):  # two epochs of 3 batches
        ids, mask, index = batch["prompt_ids"], batch["prompt_mask"], batch["row_index"]
        assert ids.shape == mask.shape and ids.shape[0] == 2 and index.shape == (2,)  # batch_size / group_size
        assert ids.dtype == mask.dtype == index.dtype == torch.long
        assert bool((mask[:, -1] == 1).all())  # every prompt ends in the last column, where generation goes on
        assert torch.equal(mask, mask.sort(dim=1).values)  # zeros (padding) first, then the prompt
        assert bool((ids[mask == 0] == PAD).all())
        for row_ids, row_mask, i in zip(ids, mask, index.tolist()):
            prompt = row_ids[row_mask.bool()].tolist()
            assert prompt == reference_prompt(ROWS[i])  # the row it points at, as mistral-common prompts it
            assert data.prompt_rows[i]["row"] == i + 1  # row_index indexes the canonical rows in file order
            seen.add(i)
    assert seen == set(range(len(ROWS))) and data.train.epoch >= 1
    assert "6 prompts of at most" in data.summary[1] and "2 per batch" in data.summary[1]


def test_prompt_ids_decode_to_the_chat_templates_prompt(tmp_path):
    v1 = bundled("v1")  # Mistral's documented v1 prompt: <s>[INST] user [/INST] answer</s>[INST] user [/INST]
    data = prompt_batches(write_rows(tmp_path, ROWS[:2]), v1, batch_size=4, group_size=2)
    batch = next(data.train)
    texts = {i: v1.decode(ids[mask.bool()].tolist(), skip_special=False)
             for ids, mask, i in zip(batch["prompt_ids"], batch["prompt_mask"], batch["row_index"].tolist())}
    assert texts[0] == "<s>[INST] What is two plus two? [/INST]"
    assert texts[1] == ("<s>[INST] Answer in one word.\n\nName a fruit. [/INST] An apple.</s>[INST] And a vegetable? "
                        "[/INST]")  # v1 puts the system prompt into the first user turn


def test_batch_size_no_multiple_of_num_generations_is_refused(tmp_path, v3):
    with pytest.raises(ConfigError, match=r"^trainer\.batch_size=6 must be a multiple of trainer\.grpo\."
                                          r"num_generations=4: .*trainer\.batch_size=4\)$"):
        prompt_batches(write_rows(tmp_path), v3, batch_size=6, group_size=4)


def test_small_data_is_counted_in_prompts(tmp_path, v3):
    with pytest.raises(SmallDataError) as err:
        prompt_batches(write_rows(tmp_path, ROWS[:3]), v3, batch_size=16, group_size=4)
    assert str(err.value) == (f"data.path {tmp_path / 'prompts.jsonl'}: 3 prompts, fewer than the 4 prompts of one "
                              "batch (trainer.batch_size=16 completions / trainer.grpo.num_generations=4); lower "
                              "trainer.batch_size to 12, lower trainer.grpo.num_generations or add prompts")


def test_a_prompt_longer_than_max_seq_len_is_named(tmp_path, v3):
    rows = [ROWS[0], ROWS[2], ROWS[4], ROWS[5]]  # the third is the longest
    limit = len(reference_prompt(ROWS[4])) - 1
    with pytest.raises(ValueError, match=rf"prompts\.jsonl row 3: the prompt is {limit + 1} tokens, longer than "
                                         rf"trainer\.max_seq_len={limit}; prompts are never cut"):
        prompt_batches(write_rows(tmp_path, rows), v3, max_seq_len=limit)


def test_resume_continues_with_the_same_batches(tmp_path, v3):
    path = write_rows(tmp_path)
    first = prompt_batches(path, v3, batch_size=8, group_size=2)  # 4 prompts a batch: epochs of 1.5 batches
    list(islice(first.train, 2))  # the position is now inside the second epoch
    state = first.train.state_dict()
    expected = list(islice(first.train, 4))
    resumed = prompt_batches(path, v3, batch_size=8, group_size=2)
    resumed.train.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint stores it
    for want, got in zip(expected, islice(resumed.train, 4)):
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    other = prompt_batches(path, v3, batch_size=8, group_size=4)  # 2 prompts a batch: not this position's data
    with pytest.raises(ValueError, match="batch_size=4, this run has batch_size=2"):
        other.train.load_state_dict(state)


def test_held_out_prompts_with_an_answer_are_scored_by_exact_match(tmp_path, v3, monkeypatch):
    held = write_rows(tmp_path, ROWS[:4], "held.jsonl")
    data = prompt_batches(write_rows(tmp_path), v3, eval_path=held)
    assert [r["answer"] for r in data.eval_rows] == ["four", "carrot", "hello", "49"]
    seen = []

    def fake_generate(model, ids, max_new_tokens, attention_mask=None, eos_token_id=None, **_):
        outs = []
        for row_ids, row_mask in zip(ids.tolist(), attention_mask.tolist()):
            prompt = [i for i, keep in zip(row_ids, row_mask) if keep]
            seen.append(prompt)
            reply = "four" if "two plus two" in v3.decode(prompt) else "wrong"
            outs.append(v3.encode(reply) + [v3.eos_id] * 3)
        width = max(map(len, outs))
        return torch.cat([ids, torch.tensor([o + [v3.eos_id] * (width - len(o)) for o in outs])], dim=1)

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    result = evaluate.exact_match(torch.nn.Linear(1, 1), v3, data.eval_rows, batch_size=4)
    assert seen == [reference_prompt(r) for r in ROWS[:4]]  # the prompt turns are the prompt, tools included
    assert result["n"] == 4 and result["exact_match"] == pytest.approx(1 / 4)


def test_read_data_passes_num_generations_as_the_group_size(tmp_path, v3, monkeypatch):
    if "grpo" not in OBJECTIVES:  # the grpo entry is built with the objective (issue 17); its data kind is this one
        monkeypatch.setitem(OBJECTIVES, "grpo", ObjectiveEntry(lambda *_: None, "prompt", perplexity=False))
    cfg = RunConfig(data=DataSpec(path=str(write_rows(tmp_path)), format="auto", packing=False),
                    trainer=TrainerSpec(objective="grpo", batch_size=6, max_seq_len=256, seed=1))
    cfg.trainer.grpo.num_generations = 3
    assert next(read_data(cfg, v3).train)["prompt_ids"].shape[0] == 2  # 6 completions, 3 per prompt
    cfg.trainer.grpo.num_generations = 4
    with pytest.raises(ConfigError, match="trainer.grpo.num_generations=4"):
        read_data(cfg, v3)
    cfg.trainer.objective = "sft"  # prompts are not chat rows: refused naming what would read them
    with pytest.raises(ValueError, match="holds prompts, but trainer.objective=sft trains on chat rows"):
        read_data(cfg, v3)


# --- bundled prompts ----------------------------------------------------------------------------------------

def test_bundled_prompts_are_the_chat_questions_and_answers_and_load_for_prompt_objectives(v3):
    spec = importlib.util.spec_from_file_location("make_tiny_prompts", ROOT / "scripts" / "make_tiny_prompts.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for split in ("train", "eval"):  # the files are the script's output (never edited by hand)
        assert bundled_prompts_path(split).read_text() == script.render(bundled_chat_path(split))
    chat = [json.loads(line) for line in bundled_chat_path("eval").read_text().splitlines()]
    train, held = load_splits(DataSpec(format="prompt_only"))  # data.path null: the bundled prompts
    assert train.kind == "prompt" and len(train) == 1968 and len(held) == 100
    assert [(r["prompt"], r["answer"]) for r in held] == [([c["messages"][0]], c["answer"]) for c in chat]
    data = build_batches(DataSpec(format="prompt_only"), Batching(False, 64, PAD, 8, group_size=4), v3, train, held)
    assert next(data.train)["prompt_ids"].shape[0] == 2 and len(data.eval_rows) == 100
    assert encode_prompt(held.rows[0], v3, None, 64) == reference_prompt({"prompt": "Which colour is the ball?"})
