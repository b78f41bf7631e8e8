"""Encoder families beyond BERT through the CLI: RoBERTa, DistilBERT, DeBERTa-v2, ModernBERT (tiny random models
with all-MiniLM-L6-v2's tokenizer). The classification head is trained whole, never a LoRA target; sequences
longer than the position table are clamped with a note."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import run

FAMILIES = {
    "roberta": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                    max_position_embeddings=66),
    "distilbert": dict(n_layers=2, dim=32, n_heads=4, hidden_dim=64, max_position_embeddings=64),
    "deberta-v2": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                       max_position_embeddings=64),
    "modernbert": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                       max_position_embeddings=64),
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from rankwise.models import embedded_path

    tok = AutoTokenizer.from_pretrained(embedded_path("minilm"))
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
               cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id)
    dirs = {}
    for kind, extra in FAMILIES.items():
        cfg = AutoConfig.for_model(kind, vocab_size=tok.vocab_size, **extra,
                                   **{k: v for k, v in ids.items() if kind != "distilbert" or k == "pad_token_id"})
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(kind)
        AutoModel.from_config(cfg).save_pretrained(path)
        tok.save_pretrained(path)
        dirs[kind] = path
    return dirs


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "rows.tsv"
    path.write_text("sentence\tlabel\n" + "".join(f"review {i}: the film was {'good' if i % 2 else 'bad'}\t{i % 2}\n"
                                                 for i in range(40)))
    return path


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_classifier_trains_exports_and_reloads(family_dirs, rows, tmp_path, kind):
    from transformers import AutoModelForSequenceClassification

    from rankwise.cli.evaluate import load_with_adapter
    from rankwise.targets import task_heads

    out = tmp_path / "run"
    r = run("train", "--model", family_dirs[kind], "--task", "seq-cls", "--data", rows, "--text-field", "sentence",
            "--steps", "3", "--lr", "1e-2", "--seq-len", "32", "--rank", "4", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    trained, tok = load_with_adapter(None, out / "adapter")
    heads = task_heads(trained.get_base_model())
    assert heads and set(cfg["modules_to_save"]) == set(heads)
    lora_layers = [n for n, _ in trained.named_modules() if n.endswith(".lora_A")]
    assert lora_layers and not any(f".{h}." in n for n in lora_layers for h in heads)  # the head is never a target
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged")
    b = tok(["the film was good", "a bad film"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert (merged(**b).logits - trained(**b).logits).abs().max() <= 1e-5  # fp32, the same weights
    fresh = AutoModelForSequenceClassification.from_pretrained(family_dirs[kind], num_labels=2)
    w = dict(merged.named_parameters())
    changed = [n for n, p in fresh.named_parameters() if n.startswith(heads[-1] + ".") and not torch.equal(p, w[n])]
    assert changed  # the trained head travels with the adapter and the merged model


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_quantize_and_compress_clamp_the_sequence_length(family_dirs, tmp_path, kind):
    for verb in (["quantize", "--method", "gptq", "--group-size", "32"], ["compress", "--method", "svd-llm"]):
        r = run(*verb, "--model", family_dirs[kind], "--seq-len", "256", "--n-samples", "4", "--eval-tokens", "256",
                "--out", tmp_path / verb[0])
        assert r.returncode == 0, r.stderr[-3000:]
        assert "usable positions" in r.stdout + r.stderr
        assert "embedding cosine" in (tmp_path / verb[0] / "report.md").read_text()


def test_usable_length_of_roberta_skips_the_padding_offset(family_dirs):
    import rankwise as rw
    from rankwise.models import usable_length

    model, _ = rw.load_model(family_dirs["roberta"])
    assert usable_length(model) == 66 - model.config.pad_token_id - 1
    ids = torch.full((1, usable_length(model)), 5)
    model(input_ids=ids)  # the longest sequence fits the position table
    with pytest.raises((IndexError, RuntimeError)):
        model(input_ids=torch.full((1, usable_length(model) + 1), 5))
