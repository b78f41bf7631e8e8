"""Model loading and data sources, including their errors."""

import json

import pytest

import rankwise as rw
from rankwise.data import pydoc_texts
from rankwise.errors import DataError, ModelLoadError
from rankwise.models import embedded_path


def test_missing_model_path(tmp_path):
    with pytest.raises(ModelLoadError, match="not found.*smollm2"):
        rw.load_model(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        rw.load_model(tmp_path)


def test_not_a_gguf(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        rw.load_model(f)


def test_truncated_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path / "cache"))
    src = embedded_path("smollm2")
    f = tmp_path / "cut.gguf"
    with open(src, "rb") as fh:
        f.write_bytes(fh.read(200_000))  # header present, tensors cut off
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        rw.load_model(f)
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_local_folder_loads(tiny_model_dir):
    model, tok = rw.load_model(tiny_model_dir)
    assert type(model).__name__ == "LlamaForCausalLM" and tok.pad_token is not None


def test_pydoc_split_is_deterministic_and_disjoint():
    from pydoc_data.topics import topics

    train, held = pydoc_texts("train"), pydoc_texts("eval")
    assert train == pydoc_texts("train") and held == pydoc_texts("eval")
    total = sum(len([p for p in t.split("\n\n") if p.strip()]) for t in topics.values())
    assert len(train) + len(held) == total  # every paragraph in exactly one split (some texts repeat)
    share = sum(map(len, held)) / sum(map(len, train + held))
    assert 0.05 <= share <= 0.2  # about a tenth of the text is held out


def test_load_data_pydoc_shapes(tiny_model_dir):
    _, tok = rw.load_model(tiny_model_dir)
    batches = rw.load_data("pydoc", tok, seq_len=32, n=10, batch_size=4)
    assert [b["input_ids"].shape for b in batches] == [(4, 32), (4, 32), (2, 32)]
    assert all(bool(b["attention_mask"].all()) for b in batches)  # packed: no padding


def test_load_data_jsonl(tiny_model_dir, tmp_path):
    _, tok = rw.load_model(tiny_model_dir)
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "def f(x): return x"}) + "\n\n" +
                 json.dumps({"prompt": "Question: what is 2+2?", "completion": " 4"}) + "\n")
    (b,) = rw.load_data(f, tok, seq_len=64, batch_size=8)
    assert b["input_ids"].shape[0] == 2
    n_prompt = len(tok("Question: what is 2+2?")["input_ids"])
    assert bool((b["labels"][1, :n_prompt] == -100).all()) and bool((b["labels"][1, n_prompt:][b["attention_mask"][1, n_prompt:] == 1] != -100).all())
    assert int(b["attention_mask"][0].sum()) < b["input_ids"].shape[1]  # the shorter row is padded


@pytest.mark.parametrize("content,match", [
    ('{"text": "ok"}\n{"text": broken}\n', r"d\.jsonl:2: malformed JSON"),
    ('{"text": "ok"}\n{"body": "x"}\n', r"d\.jsonl:2: no 'text' field"),
    ('["a"]\n', r"d\.jsonl:1: expected a JSON object"),
    ("", "gave no sequences"),
])
def test_load_data_errors(tiny_model_dir, tmp_path, content, match):
    _, tok = rw.load_model(tiny_model_dir)
    f = tmp_path / "d.jsonl"
    f.write_text(content)
    with pytest.raises(DataError, match=match):
        rw.load_data(f, tok)


def test_missing_data_file(tiny_model_dir, tmp_path):
    _, tok = rw.load_model(tiny_model_dir)
    with pytest.raises(DataError, match="does not exist"):
        rw.load_data(tmp_path / "none.txt", tok)
