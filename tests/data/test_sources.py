"""Data sources: every file type, folders, mixing weights, streaming, held-out split, bad input."""

import json

import datasets
import pytest

from mistral_train.data.spec import DataSpec
from mistral_train.data.formats import to_canonical
from mistral_train.data.sources import bundled_chat_path, load_rows, load_splits
from mistral_train.data.text import bundled_corpus_path, read_txt


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    # load_dataset converts Parquet/CSV into a cache: keep it inside the test's folder.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    datasets.disable_progress_bars()


def chat(i):
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


def pc(i):
    return {"prompt": f"question {i}", "completion": f"answer {i}"}


def write_jsonl(path, rows, blank_after=()):
    lines = []
    for i, row in enumerate(rows):
        lines.append(row if isinstance(row, str) else json.dumps(row))
        lines += [""] * (i in blank_after)
    path.write_text("\n".join(lines) + "\n")
    return path


def spec(path, **kw):
    return DataSpec(path=str(path) if not isinstance(path, list) else [str(p) for p in path], **kw)


def plain(rows):
    """Canonical rows without their provenance, for comparing contents."""
    return [{k: v for k, v in r.items() if k not in ("source", "row")} for r in rows]


def test_jsonl_rows_carry_their_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [chat(i) for i in range(4)], blank_after={1})
    rows = list(load_rows(spec(path, format="messages")))
    assert [r["row"] for r in rows] == [1, 2, 4, 5]  # line 3 is blank
    assert {r["source"] for r in rows} == {str(path)}
    assert plain(rows) == [to_canonical(chat(i), "messages", {}, "x") for i in range(4)]


def test_jsonl_reading_matches_datasets(tmp_path):
    # We parse JSON Lines ourselves (for line numbers); the values must be those `datasets` reads.
    rows = [{"messages": [{"role": "user", "content": "q é \u2603"}, {"role": "assistant", "content": "a\nb"}],
             "answer": "a\nb"}, chat(1)]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    ours = plain(load_rows(spec(path, format="messages")))
    theirs = datasets.load_dataset("json", data_files=str(path), split="train")
    assert ours == [to_canonical(r, "messages", {}, "x") for r in theirs]


def test_every_file_type_gives_the_same_rows(tmp_path):
    rows = [pc(i) for i in range(6)]
    expected = [to_canonical(r, "prompt_completion", {}, "x") for r in rows]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.to_csv(str(tmp_path / "a.csv"))
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "saved_dict"))
    for name in ("a.parquet", "a.csv", "a.json", "saved", "saved_dict"):
        got = list(load_rows(spec(tmp_path / name, format="prompt_completion")))
        assert plain(got) == expected, name
        assert [r["row"] for r in got] == list(range(1, 7)), name  # numbered from 1, as JSON Lines lines are
    evals = load_rows(spec(tmp_path / "a.parquet", format="prompt_completion",
                           eval_path=str(tmp_path / "saved_dict")), split="eval")
    assert plain(evals) == expected[:1]  # a saved DatasetDict gives its test split for evaluation


def test_nested_messages_survive_parquet_and_save_to_disk(tmp_path):
    rows = [chat(i) for i in range(3)]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "c.parquet"))
    ds.save_to_disk(str(tmp_path / "c"))
    for name in ("c.parquet", "c"):
        assert plain(load_rows(spec(tmp_path / name, format="auto"))) == rows


def test_folder_reads_its_data_files_and_saved_datasets_in_order(tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    write_jsonl(folder / "b.jsonl", [chat(1)])
    write_jsonl(folder / "sub" / "c.jsonl", [chat(2)])
    datasets.Dataset.from_list([chat(0)]).save_to_disk(str(folder / "a_saved"))
    (folder / "README.md").write_text("not data")
    source = load_rows(spec(folder, format="messages"))
    assert source.sources == [str(folder / "a_saved"), str(folder / "b.jsonl"), str(folder / "sub" / "c.jsonl")]
    assert plain(source) == [chat(0), chat(1), chat(2)]


def test_auto_decides_per_file_and_refuses_to_mix_text_with_chat(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "output": "a"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}])
    source = load_rows(spec([a, b], format="auto"))
    assert source.formats == {str(a): "alpaca", str(b): "sharegpt"}
    assert plain(source)[0] == plain(source)[1] == {"messages": [{"role": "user", "content": "q"},
                                                                  {"role": "assistant", "content": "a"}]}
    t = write_jsonl(tmp_path / "t.jsonl", [{"text": "plain"}])
    with pytest.raises(ValueError, match="cannot mix text and chat rows"):
        load_rows(spec([a, t], format="auto"))


def test_weights_draw_each_source_in_proportion(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [chat(i) for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [chat(100 + i) for i in range(30)])
    source = load_rows(spec([a, b], format="messages", weights=[3, 1]), seed=1)
    # 40 rows in all: a gets round(3/4 * 40) = 30 (every row three times), b gets 10 distinct rows of 30.
    assert source.drawn == {str(a): 30, str(b): 10} and source.available == {str(a): 10, str(b): 30}
    rows_a = [r["row"] for r in source if r["source"] == str(a)]
    assert sorted(rows_a) == sorted(list(range(1, 11)) * 3)
    rows_b = [r["row"] for r in source if r["source"] == str(b)]
    assert len(set(rows_b)) == 10
    again = load_rows(spec([a, b], format="messages", weights=[3, 1]), seed=1)
    assert list(again) == list(source)
    other = load_rows(spec([a, b], format="messages", weights=[3, 1]), seed=2)
    assert [r["row"] for r in other if r["source"] == str(b)] != rows_b
    with pytest.raises(ValueError, match="2 values for 3 entries"):
        load_rows(spec([a, b, a], format="messages", weights=[1, 1]))


def test_streaming_weights_follow_the_proportions_and_visit_every_row(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [chat(i) for i in range(20)])
    b = write_jsonl(tmp_path / "b.jsonl", [chat(100 + i) for i in range(20)])
    source = load_rows(spec([a, b], format="messages", weights=[3, 1], streaming=True), seed=0)
    rows = list(source)
    from_a = sum(r["source"] == str(a) for r in rows)
    assert 0.6 < from_a / len(rows) < 0.9  # 3:1 expected; b must run out once, so a restarts
    assert {(r["source"], r["row"]) for r in rows} == {(str(p), i) for p in (a, b) for i in range(1, 21)}
    assert list(source) == rows  # a second pass draws the same rows


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "csv", "saved"])
def test_streaming_gives_the_same_rows_as_reading_whole(tmp_path, kind):
    rows = [pc(i) for i in range(40)]
    path = tmp_path / f"a.{kind}"
    if kind == "jsonl":
        write_jsonl(path, rows, blank_after={5})
    elif kind == "saved":
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    else:
        getattr(datasets.Dataset.from_list(rows), f"to_{kind}")(str(path))
    whole = load_splits(spec(path, format="prompt_completion", eval_fraction=0.2), seed=3)
    lazy = load_splits(spec(path, format="prompt_completion", eval_fraction=0.2, streaming=True), seed=3)
    assert lazy[0].streaming and not whole[0].streaming
    assert list(lazy[0]) == list(whole[0]) and list(lazy[1]) == list(whole[1])
    with pytest.raises(TypeError, match="streamed"):
        len(lazy[0])


def test_eval_fraction_is_disjoint_deterministic_and_near_the_fraction(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [chat(i) for i in range(400)])
    train, evals = load_splits(spec(path, format="messages", eval_fraction=0.25), seed=0)
    lines = lambda source: [r["row"] for r in source]  # noqa: E731
    assert set(lines(train)).isdisjoint(lines(evals))
    assert sorted(lines(train) + lines(evals)) == list(range(1, 401))
    assert 60 <= len(evals) <= 140
    again = load_splits(spec(path, format="messages", eval_fraction=0.25), seed=0)
    assert lines(again[0]) == lines(train) and lines(again[1]) == lines(evals)
    assert lines(load_rows(spec(path, format="messages", eval_fraction=0.25), "eval", seed=1)) != lines(evals)
    assert load_rows(spec(path, format="messages"), "eval") is None


def test_eval_rows_are_held_out_before_weights_repeat_rows(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [chat(i) for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [chat(100 + i) for i in range(90)])
    train, evals = load_splits(spec([a, b], format="messages", weights=[1, 1], eval_fraction=0.3), seed=0)
    assert {(r["source"], r["row"]) for r in train}.isdisjoint((r["source"], r["row"]) for r in evals)


def test_bundled_chat_and_text_data():
    train, evals = load_splits(DataSpec(path=None, format="messages"))
    expected = [json.loads(line) for line in bundled_chat_path().read_text().splitlines()]
    assert plain(train) == expected
    assert len(evals) == 100 and all(r["answer"] == r["messages"][-1]["content"] for r in evals)
    text = load_rows(DataSpec(path=None, format="text"))
    assert [r["text"] for r in text] == read_txt(bundled_corpus_path())
    assert load_rows(DataSpec(path=None, format="text"), "eval") is None


# ---- bad input: each error names the file and the line (JSON Lines) or row, and what was expected

BAD_LINES = [
    ('{"messages": [}', "line 3: malformed JSON"),
    ('{"conversation": []}', "line 3: missing field 'messages'"),
    ('{"messages": "hello"}', "line 3: field 'messages' must be a list, got str"),
    ('{"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "a"}]}',
     r"line 3: messages\[0\].content must be a string, got list"),
    ('{"messages": []}', "line 3: empty conversation"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]}',
     r"line 3: messages\[1\] has role 'user' where 'assistant' was expected"),
    ('{"messages": [{"role": "human", "content": "q"}, {"role": "assistant", "content": "a"}]}',
     r"line 3: messages\[0\] has unknown role 'human'"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}',
     r"line 3: messages\[1\] is an assistant turn with empty content"),
]


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("line, message", BAD_LINES, ids=[m.split(": ")[1][:25] for _, m in BAD_LINES])
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, message, streaming):
    path = write_jsonl(tmp_path / "train.jsonl", [chat(0), chat(1), line, chat(3)])
    with pytest.raises(ValueError, match=f"^{path}.*{message}"):
        list(load_rows(spec(path, format="messages", streaming=streaming)))


def test_bad_rows_in_parquet_and_csv_name_the_row(tmp_path):
    rows = [pc(0), {"prompt": "q", "completion": None}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    with pytest.raises(ValueError, match=f"^{tmp_path / 'a.parquet'} row 2: missing field 'completion'"):
        load_rows(spec(tmp_path / "a.parquet", format="prompt_completion"))
    (tmp_path / "a.csv").write_text("prompt,completion\nq,a\nq2,\n")  # the second data row, below the header
    with pytest.raises(ValueError, match=f"^{tmp_path / 'a.csv'} row 2: missing field 'completion'"):
        load_rows(spec(tmp_path / "a.csv", format="prompt_completion"))
    (tmp_path / "a.json").write_text(json.dumps([pc(0), pc(1), {"prompt": "q"}]))
    with pytest.raises(ValueError, match=f"^{tmp_path / 'a.json'} row 3: missing field 'completion'"):
        load_rows(spec(tmp_path / "a.json", format="prompt_completion"))


def test_txt_documents_are_numbered_from_1(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first doc\n\nsecond\n\nthird\n")
    assert [(r["row"], r["text"]) for r in load_rows(spec(path, format="text"))] == [
        (1, "first doc"), (2, "second"), (3, "third")]


def test_json_array_error_names_the_line(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n {"text": "x"},\n {"text": }\n]\n')
    with pytest.raises(ValueError, match=f"^{path} line 3: malformed JSON"):
        load_rows(spec(path, format="text"))


def test_missing_file_unknown_type_and_unreadable_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_rows(spec(tmp_path / "nope.jsonl", format="messages"))
    (tmp_path / "a.xml").write_text("<a/>")
    with pytest.raises(ValueError, match=r"a.xml: unsupported data file type '.xml'; supported: .jsonl, .json"):
        load_rows(spec(tmp_path / "a.xml", format="messages"))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="bad.parquet: cannot read it as parquet data"):
        load_rows(spec(tmp_path / "bad.parquet", format="messages"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="empty_dir: folder holds no data files"):
        load_rows(spec(tmp_path / "empty_dir", format="messages"))


@pytest.mark.parametrize("streaming", [False, True])
def test_empty_file_names_the_file(tmp_path, streaming):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ValueError, match=f"^{path}: no rows"):
        list(load_rows(spec(path, format="messages", streaming=streaming)))


def test_a_split_left_empty_by_the_holdout_names_the_source(tmp_path):
    # One row and eval_fraction=0.5: either training or evaluation is left with nothing. Both are
    # errors naming the file, whichever way the seed falls; both ways occur over a few seeds.
    path = write_jsonl(tmp_path / "one.jsonl", [chat(0)])
    seen = set()
    for seed in range(12):
        with pytest.raises(ValueError, match=str(path)) as info:
            load_splits(spec(path, format="messages", eval_fraction=0.5), seed=seed)
        message = str(info.value)
        assert "none is left for training" in message or "held out by eval_fraction=0.5): no rows" in message
        seen.add("training" if "none is left for training" in message else "eval")
    assert {"training", "eval"} <= seen
