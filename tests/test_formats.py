"""Data formats: parsing, loss masks, packing, classification labels, splits and their errors."""

import json

import pytest

import rankwise as rw
from rankwise.data import DataConfig, load_dataset, read_examples
from rankwise.errors import DataError
from rankwise.data.formats import Fields

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return rw.load_model(tiny_model_dir)[1]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_plain_text_is_packed(tok, tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first paragraph about lists\n\nsecond one about dicts and sets\n\n" * 20)
    ds = read_examples(str(f), tok, "causal-lm", 16, None, 0.1, Fields())
    assert ds.examples and all(len(ids) == 16 and lab == ids for ids, lab in ds.examples)
    stream = sum((ids for ids, _ in ds.examples), [])
    assert tok.eos_token_id in stream  # documents are separated by EOS


def test_prompt_completion_masks_prompt(tok, tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"question": "What is 2+2?", "answer": "#### 4"}])
    ds = read_examples(str(f), tok, "causal-lm", 64, None, 0.1, Fields(prompt_field="question", completion_field="answer"))
    ids, labels = ds.examples[0]
    n_prompt = len(tok("What is 2+2?")["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id


def test_chat_messages_score_only_assistant_turns(tok, tmp_path):
    tok.chat_template = CHATML
    msgs = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello friend"},
            {"role": "user", "content": "and more"}, {"role": "assistant", "content": "sure thing"}]
    f = _jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
    ids, labels = read_examples(str(f), tok, "causal-lm", 256, None, 0.1, Fields()).examples[0]
    scored = tok.decode([t for t, lab in zip(ids, labels) if lab != -100])
    assert "hello friend" in scored and "sure thing" in scored
    assert "hi there" not in scored and "and more" not in scored and "assistant\n" not in scored


def test_classification_tsv(tok, tmp_path):
    f = tmp_path / "s.tsv"
    f.write_text('sentence\tlabel\na "quoted" good film\t1\nbad\t0\nfine\t1\n')
    ds = read_examples(str(f), tok, "seq-cls", 32, None, 0.1, Fields(text_field="sentence"))
    assert ds.label_names == ["0", "1"] and [lab for _, lab in ds.examples] == [1, 0, 1]
    (b,) = rw.data.batchify(ds.examples, tok, 8)
    assert b["labels"].tolist() == [1, 0, 1] and b["labels"].shape == (3,)


@pytest.mark.parametrize("content,fields,match", [
    ("text,label\nok,1\nbad,7\n", {"labels": ["0", "1"]}, r"s\.csv:3: label '7' is not in the label set"),
    ("body,label\nok,1\n", {}, r"s\.csv:2: no 'text' field"),
    ("text,label\nok,1,extra\n", {}, r"s\.csv:2: more columns"),
])
def test_classification_errors(tok, tmp_path, content, fields, match):
    f = tmp_path / "s.csv"
    f.write_text(content)
    with pytest.raises(DataError, match=match):
        load_dataset(DataConfig(train=str(f), eval=str(f), **fields), tok, "seq-cls")


def test_truncation_is_counted_and_empty_is_an_error(tok, tmp_path):
    long = " ".join(["word"] * 200)
    f = _jsonl(tmp_path / "t.jsonl", [{"text": long}, {"text": "short"}])
    train, _ = load_dataset(DataConfig(train=str(f), eval=str(f), seq_len=16), tok)
    assert train.truncated == 1 and max(len(ids) for ids, _ in train.examples) == 16
    g = _jsonl(tmp_path / "p.jsonl", [{"prompt": long, "completion": "x"}])
    with pytest.raises(DataError, match="empty after splitting, truncation"):
        load_dataset(DataConfig(train=str(g), eval=str(g), seq_len=16), tok)


def test_split_is_deterministic_and_disjoint(tok, tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"text": f"example number {i}"} for i in range(200)])
    a_train, a_eval = load_dataset(DataConfig(train=str(f), eval_fraction=0.2, seq_len=32), tok)
    b_train, b_eval = load_dataset(DataConfig(train=str(f), eval_fraction=0.2, seq_len=32), tok)
    assert a_train.examples == b_train.examples and a_eval.examples == b_eval.examples
    assert 20 <= len(a_eval.examples) <= 60 and len(a_train.examples) + len(a_eval.examples) == 200
    assert not {tuple(i) for i, _ in a_train.examples} & {tuple(i) for i, _ in a_eval.examples}


@pytest.mark.parametrize("name,content,match", [
    ("s.csv", "text,label\nok,1\nshort\n", r"s\.csv:3: 1 of 2 columns; no cell for label"),
    ("s.tsv", "sentence\tlabel\nok\t1\nshort\n", r"s\.tsv:3: 1 of 2 columns"),
    ("s.jsonl", '{"text": "ok", "label": 1}\n{"text": "x", "label": null}\n', r"s\.jsonl:2: field 'label' is null"),
    ("s.jsonl", '{"text": "ok", "label": 1}\n{"text": null, "label": 0}\n', r"s\.jsonl:2: field 'text' is null"),
    ("s.csv", "text,label\nok,1\nfine,\n", r"s\.csv:3: field 'label' is empty"),
])
def test_missing_cells_and_nulls_are_errors_not_a_class(tok, tmp_path, name, content, match):
    f = tmp_path / name
    f.write_text(content)
    fields = {"text_field": "sentence"} if name.endswith(".tsv") else {}
    with pytest.raises(DataError, match=match):
        load_dataset(DataConfig(train=str(f), eval=str(f), **fields), tok, "seq-cls")


def test_null_text_in_lm_records_is_an_error(tok, tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": None, "completion": "c"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'prompt' is null"):
        read_examples(str(f), tok, "causal-lm", 32, None, 0.1, Fields())


def test_numeric_labels_sort_as_numbers(tok, tmp_path):
    from rankwise.data.formats import sort_labels

    assert sort_labels(["10", "2", "1"]) == ["1", "2", "10"] and sort_labels(["b", "a", "10"]) == ["10", "a", "b"]
    f = tmp_path / "s.csv"
    f.write_text("text,label\n" + "".join(f"x{i},{i % 12}\n" for i in range(24)))
    ds = read_examples(str(f), tok, "seq-cls", 16, None, 0.1, Fields())
    assert ds.label_names == [str(i) for i in range(12)] and ds.examples[10][1] == 10


@pytest.mark.parametrize("name", ["d.JSONL", "d.json"])
def test_record_suffixes_any_case_and_json_arrays(tok, tmp_path, name):
    rows = [{"prompt": "What is 2+2?", "completion": " 4"}, {"text": "plain"}]
    f = tmp_path / name
    f.write_text(json.dumps(rows) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in rows))
    ds = read_examples(str(f), tok, "causal-lm", 64, None, 0.1, Fields())
    assert len(ds.examples) == 2 and -100 in ds.examples[0][1]  # read as records: the prompt is masked


@pytest.mark.parametrize("name", ["d.parquet", "notes", "d.xlsx"])
def test_unknown_file_types_are_an_error(tok, tmp_path, name):
    f = tmp_path / name
    f.write_bytes(b"PAR1 whatever")
    with pytest.raises(DataError, match="unknown data format"):
        read_examples(str(f), tok, "causal-lm", 64, None, 0.1, Fields())


def test_bom_header_and_bad_bytes(tok, tmp_path):
    f = tmp_path / "excel.csv"
    f.write_bytes("\ufeffsentence,label\ngood,1\nbad,0\n".encode("utf-8"))
    ds = read_examples(str(f), tok, "seq-cls", 16, None, 0.1, Fields(text_field="sentence"))
    assert ds.label_names == ["0", "1"] and len(ds.examples) == 2
    g = tmp_path / "latin1.tsv"
    g.write_bytes("sentence\tlabel\nfine\t1\ncaf\xe9\t0\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.tsv:3: not valid UTF-8"):
        read_examples(str(g), tok, "seq-cls", 16, None, 0.1, Fields(text_field="sentence"))


def test_explicit_eval_file_is_not_cut(tok, tmp_path):
    f = _jsonl(tmp_path / "dev.jsonl", [{"text": f"sentence number {i}"} for i in range(100)])
    _, ev = load_dataset(DataConfig(train=str(f), eval=str(f), seq_len=16), tok)
    assert len(ev.examples) == 100 and not ev.packed
    _, ev = load_dataset(DataConfig(train=str(f), eval=str(f), seq_len=16, max_eval_examples=10), tok)
    assert len(ev.examples) == 10 and ev.available == 100
