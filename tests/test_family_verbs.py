"""Every verb on every family, on tiny random models (issue: every common model family, every verb).

Decoders (causal LM) and encoders (sequence classification, the head trained whole) through the library:
- init with EVA, PiSSA and LoRA-GA leaves the model's outputs as they were; after one training step the peft
  adapter loads in `PeftModel` on the saved base and the merged folder in plain `from_pretrained`, both with
  the trained model's outputs;
- RTN, GPTQ and AWQ → compressed-tensors, reloaded by plain `from_pretrained` with rankwise's own outputs
  (MoE and ModernBERT: refused, the dense folder reloads instead);
- SVD-LLM and mixed precision, merged and reloaded.
Tolerance 1e-5 relative: float32 weights on both sides, only the order of float32 sums differs (a few ε32 ≈
1e-7 per sum through two blocks). The CLI's `train` runs once per decoder family at the end.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_batches
from test_arch import ENCODERS
from test_cli import run
from test_decoder_families import DENSE, GPT2, MOE, tiny

import rankwise as rw
from rankwise.errors import QuantError

# GPT-2's Conv1D projections are linearized first (rankwise.load_model does it; dense exports write Conv1D again)
DECODERS = {"llama": {}, **DENSE, **MOE, "gpt2": GPT2}
KINDS = list(DECODERS) + list(ENCODERS)
TOL = 1e-5
# transformers 5.23 cannot reload these as compressed-tensors (MoE: fused experts saved per expert; ModernBERT:
# its weight init reads every Linear's weight; GPT-2: Conv1D, not Linear): refused before any work, the dense
# folder reloads instead.
NO_CT = {"mixtral", "qwen3_moe", "modernbert", "gpt2"}
# MoE: the fused experts are said to stay float where a verb does not reach them (tested in test_decoder_families)
pytestmark = pytest.mark.filterwarnings("ignore:.*fused MoE expert")


def build(kind: str):
    if kind in DECODERS:
        model = tiny(kind, DECODERS[kind])
        rw.linearize_conv1d_(model)  # as rankwise.load_model does
        rw.unfuse_experts_(model)
        return model
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(kind, vocab_size=96, pad_token_id=0, num_labels=2, **ENCODERS[kind])
    return AutoModelForSequenceClassification.from_config(cfg).eval()


def batches_for(kind: str, n=3):
    batches = make_batches(n, 3, 16, labels=kind in DECODERS)
    if kind not in DECODERS:
        for i, b in enumerate(batches):
            b["labels"] = torch.tensor([(i + j) % 2 for j in range(3)])
    return batches


def outputs(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def reload(kind: str, path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if kind in DECODERS else AutoModelForSequenceClassification
    model, info = cls.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info
    return model.eval()


def _train_step(model, batch, task: str) -> None:
    from rankwise.losses import loss_terms

    loss, n = loss_terms(model, batch, task)
    (loss / n).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.5 * p.grad / (p.grad.norm() + 1e-12))
                p.grad = None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["eva", "pissa", "lora-ga"])
def test_init_train_and_export(kind, method, tmp_path):
    from peft import PeftModel

    from rankwise.calib.gradients import calibrate_gradients
    from rankwise.cli.runs import head_modules

    model, batches = build(kind), batches_for(kind)
    model.save_pretrained(tmp_path / "base")
    ref = outputs(model, batches[0])
    stats = {"eva": lambda: rw.calibrate(model, batches, progress=False), "pissa": lambda: None,
             "lora-ga": lambda: calibrate_gradients(model, batches, progress=False)}[method]()
    extra = {} if kind in DECODERS else {"modules_to_save": head_modules(model)}
    pm = rw.adapt_(copy.deepcopy(model), rw.plan(stats, model, method=method, rank=4), **extra)
    assert rel(outputs(pm, batches[0]), ref) <= TOL  # every init starts where the model was
    adapted = [n for n, m in pm.named_modules() if hasattr(m, "lora_A")]
    assert (kind in MOE) == any(".experts." in n for n in adapted)  # MoE: each expert has its own LoRA
    pm.train()
    _train_step(pm, batches[1], "causal-lm" if kind in DECODERS else "seq-cls")
    pm.eval()
    trained = outputs(pm, batches[0])
    assert rel(trained, ref) > 1e-3  # the step moved it
    rw.export(pm, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(reload(kind, tmp_path / "base"), tmp_path / "adapter").eval()
    assert rel(outputs(loaded, batches[0]), trained) <= TOL
    from rankwise.export.peft import export_merged

    export_merged(pm, None, tmp_path / "merged")
    assert rel(outputs(reload(kind, tmp_path / "merged"), batches[0]), trained) <= TOL


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_quantize_to_compressed_tensors(kind, method, tmp_path):
    from rankwise.export.compressed_tensors import export_compressed_tensors

    model, batches = build(kind), batches_for(kind)
    ref = outputs(model, batches[0])
    options = {"explicit_scales": False} if method == "awq" else {}
    rw.quantize(model, batches, method, bits=4, group_size=32, progress=False, **options)
    ours = outputs(model, batches[0])
    assert rel(ours, ref) > 1e-4  # it really is quantized
    if kind in NO_CT:
        with pytest.raises(QuantError, match="does not reload"):
            export_compressed_tensors(model, tmp_path / "ct")
        rw.export_model(model, tmp_path / "dense", "safetensors")
        assert rel(outputs(reload(kind, tmp_path / "dense"), batches[0]), ours) <= TOL
        return
    export_compressed_tensors(model, tmp_path / "ct")
    loaded = reload(kind, tmp_path / "ct")
    loaded.hf_quantizer.compressor.decompress_model(loaded)
    assert rel(outputs(loaded, batches[0]), ours) <= TOL


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["svd-llm", "mixed"])
def test_compress_merged_reloads(kind, method, tmp_path):
    model, batches = build(kind), batches_for(kind)
    ref = outputs(model, batches[0])
    if method == "mixed":
        rw.mixed_precision(model, batches, avg_bits=5, progress=False, group_size=32)
    else:
        rw.compress(model, batches, method, ratio=0.8, progress=False)
    ours = outputs(model, batches[0])
    assert rel(ours, ref) > 1e-4
    rw.export_model(model, tmp_path / "merged", "safetensors")
    assert rel(outputs(reload(kind, tmp_path / "merged"), batches[0]), ours) <= TOL


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from conftest import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("kind", list(DECODERS))
def test_cli_train_per_family(kind, tokenizer_dir, tmp_path):
    """`rankwise train` (EVA, 2 steps) on each decoder family saved with a real BPE tokenizer: adapter, merged
    folder and report written."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    kw = dict(DECODERS[kind], vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    from test_decoder_families import BASE

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(kind, **{k: v for k, v in (BASE | kw).items() if v is not None})
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    r = run("train", "--model", tmp_path / "m", "--data", "pydoc", "--method", "eva", "--rank", "4", "--seq-len", "32",
            "--steps", "2", "--max-eval-examples", "8", "--out", tmp_path / "run", "--quiet")
    assert r.returncode == 0, r.stderr
    assert {"adapter", "merged", "report.md"} <= {p.name for p in (tmp_path / "run").iterdir()}
    if kind in ("gpt2", *MOE):  # the adapter read back by rankwise: GPT-2's Conv1D, MoE LoRA on fused experts
        r = run("eval", "--adapter", tmp_path / "run" / "adapter", "--data", "pydoc")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["perplexity"] > 1
    if kind == "gpt2":  # 128 positions: eval's default --seq-len 256 is cut with a note on stderr, stdout stays JSON
        assert f"using {AutoConfig.from_pretrained(tmp_path / 'm').n_positions}" in r.stderr


def test_gpt2_factored_folder_round_trip(tmp_path):
    """SVD-LLM on GPT-2 (linearized Conv1D): the factored folder reloads through rankwise.load_model with the
    compressed model's outputs (the untouched layers in Conv1D's layout, the factored ones as B·A)."""
    from rankwise.models import load_model

    model, batches = build("gpt2"), batches_for("gpt2")
    rw.compress(model, batches, "svd-llm", ratio=0.8, progress=False)
    ours = outputs(model, batches[0])
    rw.export_model(model, tmp_path / "f", "factored")
    from conftest import build_tiny_model_dir
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(build_tiny_model_dir(tmp_path / "tok")).save_pretrained(tmp_path / "f")
    loaded, _ = load_model(tmp_path / "f")
    assert rel(outputs(loaded, batches[0]), ours) <= TOL
