"""Evaluation metrics against brute force."""

import math

import pytest
import torch
import torch.nn.functional as F

from rankwise.train.evaluate import exact_match, final_number, perplexity

from conftest import tiny_llama


def _token_nll(model, ids, context):
    """NLL of each token i ≥ 1 given at most `context` previous tokens, one forward per token."""
    total = 0.0
    for i in range(1, len(ids)):
        ctx = ids[max(0, i - context) : i]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ctx])).logits[0, -1]
        total += float(F.cross_entropy(logits[None], torch.tensor([ids[i]])))
    return total


def test_perplexity_single_window_is_exact():
    model = tiny_llama()
    ids = torch.randint(3, 96, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    res = perplexity(model, ids, window=64, stride=64)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    nll = float(F.cross_entropy(logits, torch.tensor(ids[1:])))
    assert res["tokens"] == 39 and res["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_perplexity_sliding_window_counts_each_token_once():
    model = tiny_llama()
    ids = torch.randint(3, 96, (50,), generator=torch.Generator().manual_seed(1)).tolist()
    res = perplexity(model, ids, window=16, stride=8, batch_size=3)
    assert res["tokens"] == 49
    # with window 16 and stride 8, a token scored in a window starting at b sees the tokens from b on
    expected = 0.0
    begin = 0
    scored_until = 0
    while True:
        end = min(begin + 16, len(ids))
        for i in range(max(scored_until, begin + 1), end):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids[begin:i]])).logits[0, -1]
            expected += float(F.cross_entropy(logits[None], torch.tensor([ids[i]])))
        scored_until = end
        if end == len(ids):
            break
        begin += 8
    assert res["nll"] == pytest.approx(expected / 49, rel=1e-5)


@pytest.mark.parametrize("text,expected", [
    ("so 3 + 4 = 7\n#### 7", "7"), ("#### 1,234", "1234"), ("The answer is 12.", "12"),
    ("#### 2.50", "2.5"), ("no number here", None), ("first 3 then -5", "-5"), ("#### 18 dollars, not 20", "18"),
])
def test_final_number(text, expected):
    assert final_number(text) == expected


def test_exact_match_batched_greedy_equals_one_by_one(tiny_model_dir):
    import rankwise as rw

    model, tok = rw.load_model(tiny_model_dir)
    prompts = ["def f(x):", "import os and then a longer prompt", "x"]
    res = exact_match(model, tok, prompts, ["#### 1"] * 3, max_new_tokens=6, batch_size=3)
    assert tok.padding_side == "right"  # restored after generation
    for prompt, got in zip(prompts, res["outputs"]):  # left padding must not change what greedy decoding says
        enc = tok([prompt], return_tensors="pt")
        gen = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        assert got["output"] == tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_exact_match_scores_the_final_numbers(tiny_model_dir, monkeypatch):
    import rankwise as rw

    model, tok = rw.load_model(tiny_model_dir)
    replies = ["so 3 + 4 = 7\n#### 7", "I think #### 5", "no idea", "#### .5"]

    def fake_generate(input_ids, attention_mask, **kw):  # the model "answers" replies[i] to prompt i
        rows = [tok(r, add_special_tokens=False)["input_ids"] for r in replies[fake_generate.i : fake_generate.i + len(input_ids)]]
        fake_generate.i += len(input_ids)
        width = max(map(len, rows))
        tail = torch.tensor([r + [tok.eos_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, tail], dim=1)

    fake_generate.i = 0
    monkeypatch.setattr(model, "generate", fake_generate)
    res = exact_match(model, tok, ["q1", "q2", "q3", "q4"], ["#### 7", "#### 4", "#### 1", "#### 0.50"], batch_size=3)
    assert [o["correct"] for o in res["outputs"]] == [True, False, False, True] and res["exact_match"] == 0.5


@pytest.mark.parametrize("window", [8, 16])
def test_stride_equal_to_window_scores_every_token(window):
    model = tiny_llama()
    ids = torch.randint(3, 96, (37,), generator=torch.Generator().manual_seed(2)).tolist()
    res = perplexity(model, ids, window=window, stride=window)
    assert res["tokens"] == 36  # every token after the first, none skipped at window starts
    assert res["nll"] == pytest.approx(perplexity(model, ids, window=window, stride=window - 1)["nll"], rel=1e-6)


@pytest.mark.parametrize("text,expected", [("#### .5", "0.5"), ("so it is ….5", "0.5"), ("#### -.25", "-0.25")])
def test_final_number_leading_point(text, expected):
    assert final_number(text) == expected


def test_record_perplexity_scores_only_labelled_tokens():
    from rankwise.data import batchify
    from rankwise.train.evaluate import record_perplexity

    model = tiny_llama()
    g = torch.Generator().manual_seed(3)
    examples = []
    for n, p in ((12, 5), (9, 3), (15, 10)):  # (length, prompt length)
        ids = torch.randint(3, 96, (n,), generator=g).tolist()
        examples.append((ids, [-100] * p + ids[p:]))
    res = record_perplexity(model, batchify(examples, type("T", (), {"pad_token_id": 0})(), 2))
    total, count = 0.0, 0
    for ids, lab in examples:  # each record alone, its completion tokens only
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        tgt = torch.tensor(lab[1:])
        total += float(F.cross_entropy(logits, tgt, ignore_index=-100, reduction="sum"))
        count += int((tgt != -100).sum())
    assert res["tokens"] == count == 7 + 6 + 5 and res["nll"] == pytest.approx(total / count, rel=1e-5)
