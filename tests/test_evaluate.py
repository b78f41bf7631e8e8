"""Evaluation metrics against brute force."""

import math

import pytest
import torch
import torch.nn.functional as F

from rankwise.evaluate import exact_match, final_number, perplexity

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


def test_exact_match_runs_batched_greedy(tiny_model_dir):
    import rankwise as rw

    model, tok = rw.load_model(tiny_model_dir)
    res = exact_match(model, tok, ["def f(x):", "import os"], ["#### 1", "#### 2"], max_new_tokens=5, batch_size=2)
    assert res["examples"] == 2 and len(res["outputs"]) == 2 and 0.0 <= res["exact_match"] <= 1.0
    assert tok.padding_side == "right"  # restored after generation
