"""Shared fixtures: tiny random Llama/BERT models, a tiny tokenizer, batches with padding."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

VOCAB = 96


def make_batches(n_batches=3, batch=3, seq=12, vocab=VOCAB, seed=0, pad_last=True, labels=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        ids = torch.randint(3, vocab, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        if pad_last:
            mask[-1, seq // 2 + i :] = 0  # a padded sequence in every batch, different lengths
        b = {"input_ids": ids, "attention_mask": mask}
        if labels:
            lab = ids.clone()
            lab[:, : seq // 3] = -100  # a "prompt" that must not count
            lab[mask == 0] = -100
            b["labels"] = lab
        out.append(b)
    return out


def tiny_llama(layers=2, hidden=64, inter=96, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(layers=2, hidden=64, seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers,
                     num_attention_heads=4, max_position_embeddings=64)
    return BertModel(cfg).eval()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def bert():
    return tiny_bert()


@pytest.fixture
def batches():
    return make_batches()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A tiny BERT using all-MiniLM-L6-v2's tokenizer (from its package, no download)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from rankwise.models import embedded_path

    tok = AutoTokenizer.from_pretrained(embedded_path("minilm"))
    torch.manual_seed(0)
    # initializer_range 0.2, not BERT's 0.02: at 0.02 a random tiny BERT's pooled output hardly depends on
    # the input (spread 3e-4 of its size), so no classification test could tell learning from noise.
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128, initializer_range=0.2)
    path = tmp_path_factory.mktemp("tiny-bert")
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_tiny_model_dir(path):
    """A tiny Llama saved with a small byte-level BPE tokenizer trained on the pydoc corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from rankwise.data import pydoc_texts

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(pydoc_texts("train")[:20], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path
