"""Gradient statistics and the inits built on them (LoRA-GA, LoRA-One, LoRA-SB) and SVFit's trained singular
values: sums that merge, each method's invariant, export → reload on the original base, exact resume."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from conftest import make_batches, tiny_llama
from rankwise.adapt import adapt_
from rankwise.calib.gradients import calibrate_gradients
from rankwise.calib.stats import Stats
from rankwise.errors import CalibrationError, PlanError
from rankwise.losses import loss_terms
from rankwise.plan.plan import plan

GRAD_METHODS = ["lora-ga", "lora-one", "lora-sb"]
METHODS = GRAD_METHODS + ["svfit"]


def _batches():
    return make_batches(4, 3, 12, labels=True, seed=3)


def _stats(model, batches=None):
    return calibrate_gradients(model, batches or _batches(), progress=False)


def _brute_gradient(model, batches):
    """∂(mean token loss over all batches)/∂W of every linear (autograd on a copy, all at once)."""
    m = copy.deepcopy(model)
    names = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and n != "lm_head"]
    total, count = 0.0, 0
    for b in batches:
        loss, n = loss_terms(m, b, "causal-lm")
        total, count = total + loss, count + n
    grads = torch.autograd.grad(total / count, [m.get_submodule(n).weight for n in names])
    return dict(zip(names, grads))


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def _effective(pm, name):
    """The layer's effective weight W_base + s·B·A (cores read through their R·A)."""
    layer = pm.get_base_model().get_submodule(name)
    return layer.base_layer.weight.detach() + layer.get_delta_weight("default").detach()


def test_gradient_statistics_are_the_mean_loss_gradient_and_merge_by_sum():
    model = tiny_llama()
    batches = _batches()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    whole = _stats(model, batches)
    brute = _brute_gradient(model, batches)
    assert set(whole.grads) == set(brute) and whole.grad_count == sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    for n, g in brute.items():
        assert _rel(whole.gradient(n), g) <= 1e-5  # float32 sums in another order
    # halves of the data merge by sum into the whole
    halves = _stats(model, batches[:2]) + _stats(model, batches[2:])
    assert halves.grad_count == whole.grad_count
    assert max(_rel(halves.gradient(n), whole.gradient(n)) for n in brute) <= 1e-6
    # nothing of the model changed, nothing left behind: the gradients live in the Stats only
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.requires_grad == flags[n] and p.grad is None for n, p in model.named_parameters())
    kept = sum(g.numel() * g.element_size() for g in whole.grads.values())
    assert kept == sum(model.get_submodule(n).weight.numel() * 4 for n in brute)  # the targets' fp32 gradients


def test_gradient_statistics_save_and_load(tmp_path):
    stats = _stats(tiny_llama())
    stats.save(tmp_path / "s.safetensors")
    back = Stats.load(tmp_path / "s.safetensors")
    assert back.grad_count == stats.grad_count and set(back.grads) == set(stats.grads)
    assert all(torch.equal(back.grads[n], g) for n, g in stats.grads.items())


def test_gradient_statistics_refuse_what_they_cannot_measure():
    model = tiny_llama()
    with pytest.raises(CalibrationError, match="labelled"):
        calibrate_gradients(model, make_batches(2), progress=False)
    with pytest.raises(PlanError, match="weight gradient"):
        plan(None, model, method="lora-ga", rank=2)
    from rankwise.compress.base import compress_base

    compress_base(model, None, "rtn", progress=False, bits=4, group_size=32)
    with pytest.raises(CalibrationError, match="QuantLinear"):
        calibrate_gradients(model, _batches(), progress=False)


def test_one_gradient_pass_serves_every_method_that_declares_it():
    from rankwise.methods import grads_for

    assert grads_for(["eva", "lora-ga"]) and not grads_for(["eva", "svfit", "lora"])
    model = tiny_llama()
    stats = _stats(model)
    for method in GRAD_METHODS:  # each plans from the same Stats, no second pass
        p = plan(stats, model, method=method, rank=2)
        assert all(lp.lora_A is not None for lp in p.active().values())


def _one_sgd_step(pm, batches, lr):
    params = [p for p in pm.parameters() if p.requires_grad]
    total, count = 0.0, 0
    for b in batches:
        loss, n = loss_terms(pm, b, "causal-lm")
        total, count = total + loss, count + n
    grads = torch.autograd.grad(total / count, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.sub_(lr * g)


def test_lora_ga_starts_at_the_base_and_its_first_step_follows_full_fine_tuning():
    """LoRA-GA's first SGD step is −η·s²·c²·[G]₂ᵣ to first order: its cosine with −G is ‖[G]₂ᵣ‖/‖G‖, the best
    any rank-2r update can do, and far above random LoRA's (−η·s²·G·AᵀA)."""
    model = tiny_llama()
    batches = _batches()
    stats = _stats(model, batches)
    b0 = batches[0]
    ref = model(input_ids=b0["input_ids"], attention_mask=b0["attention_mask"]).logits.detach()
    cos = {}
    for method in ("lora-ga", "lora"):
        pm = adapt_(copy.deepcopy(model), plan(stats if method == "lora-ga" else None, model, method=method, rank=2, alpha=4))
        if method == "lora-ga":  # W − s·B·A + s·B·A: the model computes what it did
            out = pm(input_ids=b0["input_ids"], attention_mask=b0["attention_mask"]).logits.detach()
            assert (out - ref).abs().max() <= 1e-5
        w0 = {n: _effective(pm, n) for n in stats.grads}
        _one_sgd_step(pm, batches, lr=1e-3)
        cos[method] = {}
        for n in stats.grads:
            dw, g = _effective(pm, n) - w0[n], stats.gradient(n).double()
            cos[method][n] = float(torch.nn.functional.cosine_similarity(dw.flatten().double(), -g.flatten(), 0))
    for n in stats.grads:
        s = torch.linalg.svdvals(stats.gradient(n).double())
        best = float(s[:4].norm() / s.norm())  # ‖[G]₂ᵣ‖/‖G‖, r = 2
        assert cos["lora-ga"][n] >= 0.99 * best, (n, cos["lora-ga"][n], best)
    assert min(cos["lora-ga"].values()) > max(cos["lora"].values())


def test_lora_one_starts_one_rank_r_gradient_step_away():
    model = tiny_llama()
    stats = _stats(model)
    p = plan(stats, model, method="lora-one", rank=2, alpha=4, gamma=64.0)
    pm = adapt_(copy.deepcopy(model), p)
    s = 4 / 2
    for n in stats.grads:
        g = stats.gradient(n).double()
        u, sv, vh = torch.linalg.svd(-g, full_matrices=False)
        step = (u[:, :2] * sv[:2]) @ vh[:2] / (64.0 * sv[0])  # [−G]_r / (γ·σ₁)
        assert _rel((_effective(pm, n) - model.get_submodule(n).weight).double(), s * step) <= 1e-4


def _adam_steps(pm, batches, steps=3, lr=1e-2):
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=lr)
    for i in range(steps):
        loss, n = loss_terms(pm, batches[i % len(batches)], "causal-lm")
        opt.zero_grad()
        (loss / n).backward()
        opt.step()


def test_lora_sb_trains_an_r_by_r_core_in_the_first_steps_subspace():
    model = tiny_llama()
    batches = _batches()
    stats = _stats(model, batches)
    r, eta = 3, 1e-3
    pm = adapt_(copy.deepcopy(model), plan(stats, model, method="lora-sb", rank=r, first_lr=eta))
    trainable = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    assert all(p.shape == (r, r) for _, p in trainable) and len(trainable) == len(stats.grads)
    start = {}
    for n in stats.grads:  # s·B·R·A = the best rank-r approximation of the first Adam step −η·sign(G)
        u, sv, vh = torch.linalg.svd(-eta * torch.sign(stats.gradient(n)).double(), full_matrices=False)
        start[n] = _effective(pm, n) - model.get_submodule(n).weight
        assert _rel(start[n].double(), (u[:, :r] * sv[:r]) @ vh[:r]) <= 1e-4
    _adam_steps(pm, batches)
    for n in stats.grads:
        layer = pm.get_base_model().get_submodule(n)
        b, a = layer.lora_B["default"].weight.double(), layer.lora_A["default"].frozen.double()
        moved = (_effective(pm, n) - model.get_submodule(n).weight - start[n]).double()
        assert moved.norm() > 1e-4 * start[n].norm()  # it trained
        pb, qa = torch.linalg.qr(b)[0], torch.linalg.qr(a.T)[0]
        assert _rel(pb @ (pb.T @ moved @ qa) @ qa.T, moved) <= 1e-5  # all of it inside span(B) ⊗ span(Aᵀ)


def test_svfit_trains_only_the_top_singular_values():
    model = tiny_llama()
    batches = _batches()
    r = 3
    pm = adapt_(copy.deepcopy(model), plan(None, model, method="svfit", rank=r))
    trainable = [p for p in pm.parameters() if p.requires_grad]
    n_layers = len(plan(None, model, method="svfit", rank=r).active())
    assert all(p.shape == (r,) for p in trainable) and len(trainable) == n_layers
    b0 = batches[0]
    ref = model(input_ids=b0["input_ids"], attention_mask=b0["attention_mask"]).logits
    out = pm(input_ids=b0["input_ids"], attention_mask=b0["attention_mask"]).logits
    assert torch.equal(out, ref)  # the core starts at 0: nothing added
    _adam_steps(pm, batches)
    for n in plan(None, model, method="svfit", rank=r).active():
        w = model.get_submodule(n).weight.detach().double()
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        moved = _effective(pm, n).double() - w
        inner = u[:, :r].T @ moved @ vh[:r].T  # in W's own top-r singular basis: diagonal, and all of it there
        # 1e-4: the method's float32 SVD of W against this float64 one (measured 2e-5)
        assert moved.norm() > 0 and _rel(torch.diag(torch.diagonal(inner)), inner) <= 1e-4
        assert _rel(u[:, :r] @ inner @ vh[:r], moved) <= 1e-4


def _seq_cls_model():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def _cls_batches():
    out = make_batches(4, 4, 12, seed=5)
    g = torch.Generator().manual_seed(1)
    for b in out:
        b["labels"] = torch.randint(0, 2, (b["input_ids"].shape[0],), generator=g)
    return out


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("method", METHODS)
def test_export_reloads_on_the_original_base_with_matching_logits(tmp_path, method, arch):
    """A plain peft LoRA adapter on the unmodified base: LoRA-GA's residual as rank 2r, the cores folded."""
    from peft import PeftModel

    from rankwise.export.peft import export

    model, batches = (tiny_llama(), _batches()) if arch == "llama" else (_seq_cls_model(), _cls_batches())
    original = copy.deepcopy(model)
    targets = "all-linear" if arch == "llama" else "query,value,dense"
    stats = calibrate_gradients(model, batches, targets, progress=False) if method in GRAD_METHODS else None
    p = plan(stats, model, method=method, targets=targets, rank=2, alpha=4)
    pm = adapt_(model, p)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the trained parts off their init, as training would
        for _, t in [(n, p) for n, p in pm.named_parameters() if p.requires_grad]:
            t.add_(0.05 * torch.randn(t.shape, generator=g))
    export(pm, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    loaded = PeftModel.from_pretrained(original, tmp_path / "adapter").eval()
    b = batches[0]
    ours = pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    theirs = loaded(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert (ours - theirs).abs().max() <= 1e-4  # float32, the same sums in another order (measured ~1e-6)
    merged = copy.deepcopy(pm).merge_and_unload()  # peft's merge reads a core's R·A as the adapter's A
    assert (merged(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits - ours).abs().max() <= 1e-4


def test_lora_ga_subspaces_agree_with_peft():
    """peft 0.21's preprocess_loraga on the same model, data and loss: the same singular subspaces of G for A
    (V[:r]) and B (U[r:2r]); peft scales B by S and only B, so the magnitudes differ by design (README).
    r = 16: peft's randomized SVD (q = 4r, 4 power iterations) then spans each layer's full width and is exact;
    at r = 2 it is not, and on a random tiny model's flat gradient spectrum (σ₂..σ₆ within 0.44–0.97 σ₁) its
    subspaces drift from the exact SVD's (cos² down to 0.92, measured)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    model = tiny_llama()
    batches = _batches()
    r = 16
    ours = plan(_stats(model, batches), model, method="lora-ga", rank=r)
    peer = copy.deepcopy(model)
    cfg = LoraConfig(r=r, lora_alpha=r, target_modules=list(ours.active()), init_lora_weights="lora_ga",
                     lora_ga_config=LoraGAConfig())

    total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)

    def train_step():  # the same loss as ours: every scored token weighs alike (peft then divides by 4 batches)
        for b in batches:
            loss, _ = loss_terms(peer, b, "causal-lm")
            (loss / total).backward()

    torch.manual_seed(0)
    preprocess_loraga(peer, cfg, train_step)
    pm = get_peft_model(peer, cfg)
    worst = 1.0
    for n, lp in ours.active().items():
        layer = pm.get_base_model().get_submodule(n)
        for mine, theirs in ((lp.lora_A.T, layer.lora_A["default"].weight.T), (lp.lora_B, layer.lora_B["default"].weight)):
            qa, qb = torch.linalg.qr(mine.double())[0], torch.linalg.qr(theirs.detach().double())[0]
            worst = min(worst, float(torch.linalg.svdvals(qa.T @ qb).pow(2).mean()))
    assert worst >= 0.99, worst


@pytest.mark.parametrize("method", ["lora-sb", "svfit"])
def test_cli_resume_of_a_trained_core_is_exact(tiny_model_dir, tmp_path, method):
    from safetensors.torch import load_file

    from test_cli import run

    out = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\nout: {out}\nmerge: false\ninit: {{method: {method}, rank: 3}}\n"
                   "data: {seq_len: 32, max_train_examples: 40}\ntrain: {steps: 8, save_every: 4, eval_every: 4, lr: 0.01}\n")
    r = run("train", "--config", cfg, "--quiet")
    assert r.returncode == 0, r.stderr
    straight = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out / "checkpoints" / "step-000008")
    r = run("train", "--out", out, "--resume", "--quiet")
    assert r.returncode == 0, r.stderr
    resumed = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    again = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(resumed) == set(straight) and all(".lora_A." in k or ".lora_B." in k for k in straight)
    assert max(float((resumed[k] - straight[k]).abs().max()) for k in straight) <= 1e-6
    assert again == pytest.approx(losses, abs=1e-6)
    summary = json.loads((out / "summary.json").read_text())  # the core did train: held-out perplexity fell
    assert summary["after"]["perplexity"] < summary["before"]["perplexity"], summary


def test_methods_are_listed_with_their_options():
    from test_cli import run

    r = run("methods")
    assert r.returncode == 0 and all(m in r.stdout for m in METHODS), r.stdout
    assert "gradient" in r.stdout  # what the gradient methods observe
    r = run("config", "show", "--method", "lora-ga")
    assert r.returncode == 0 and "direction: ArB2r" in r.stdout and "gamma: 16.0" in r.stdout
    r = run("config", "show", "--method", "lora-sb")
    assert r.returncode == 0 and "first_lr: null" in r.stdout


def test_the_invariants_hold_on_a_bert_classifier():
    """The same invariants on a tiny BERT with a classification loss: LoRA-GA and SVFit start at the base's
    outputs, LoRA-One at s·[−G]_r/(γσ₁), LoRA-SB at [−η·sign G]_r with r² trained numbers per layer, SVFit r."""
    model, batches = _seq_cls_model(), _cls_batches()
    targets, r, s = "query,value,dense", 2, 2.0
    stats = calibrate_gradients(model, batches, targets, progress=False)
    assert stats.grad_count == sum(b["labels"].numel() for b in batches)
    b0 = batches[0]

    def logits(m):
        return m(input_ids=b0["input_ids"], attention_mask=b0["attention_mask"]).logits.detach()

    ref = logits(model)
    for method in METHODS:
        p = plan(stats if method in GRAD_METHODS else None, model, method=method, targets=targets, rank=r, alpha=r * s,
                 **({"first_lr": 1e-3} if method == "lora-sb" else {}))
        pm = adapt_(copy.deepcopy(model), p)
        trainable = [t for t in pm.parameters() if t.requires_grad]
        if method in ("lora-ga", "svfit"):
            assert (logits(pm) - ref).abs().max() <= 1e-5, method
        if method == "lora-sb":
            assert all(t.shape == (r, r) for t in trainable) and len(trainable) == len(p.active())
        if method == "svfit":
            assert all(t.shape == (r,) for t in trainable) and len(trainable) == len(p.active())
        for n in p.active():
            if method not in ("lora-one", "lora-sb"):
                continue
            g = stats.gradient(n).double()
            u, sv, vh = torch.linalg.svd(-g if method == "lora-one" else -1e-3 * torch.sign(g), full_matrices=False)
            best = (u[:, :r] * sv[:r]) @ vh[:r]
            want = s * best / (128.0 * torch.linalg.svdvals(g)[0]) if method == "lora-one" else best
            assert _rel((_effective(pm, n) - model.get_submodule(n).weight).double(), want) <= 1e-4, (method, n)
