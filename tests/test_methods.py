"""Tier 2: every registered init on tiny Llama and BERT: its invariant, export → reload on the ORIGINAL
base, agreement with peft where peft has the method, one calibration for many methods, method options."""

import json
import sys

import pytest
import torch
from peft import PeftModel

import rankwise as rw
from rankwise.methods import all_methods, get_init, keep_for, scaling
from rankwise.numerics.linalg import subspace_cos2

from conftest import make_batches, tiny_bert, tiny_llama

RESIDUAL = ["pissa", "milora", "olora", "corda"]
METHODS = ["rslora"] + RESIDUAL


def _out(model, b):
    with torch.no_grad():
        o = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _plan(model, method, batches, **opts):
    keep = keep_for([method], opts.get("rank", 4))
    stats = rw.calibrate(model, batches, keep=keep, progress=False) if keep is not None else None
    return rw.plan(stats, model, method=method, **({"rank": 4, "alpha": 8} | opts)), stats


def _perturb(pm, seed=0):
    """Move A and B as training would, so that a wrong export shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in pm.modules():
            if hasattr(m, "lora_B") and "default" in m.lora_B:
                for p in (m.lora_A["default"].weight, m.lora_B["default"].weight):
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert])
@pytest.mark.parametrize("method,opts", [("rslora", {}), ("pissa", {}), ("pissa", {"niter": 4}), ("milora", {}),
                                         ("olora", {}), ("corda", {"mode": "ipm"}), ("corda", {"mode": "kpm"})])
def test_invariants_and_export_to_the_original_base(make, method, opts, tmp_path):
    model, batches = make(), make_batches(n_batches=4, batch=4, seq=16)
    original = {n: m.weight.detach().double().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    before = _out(model, batches[0])
    p, stats = _plan(model, method, batches, **opts)
    pm = rw.adapt_(model, p)
    assert (_out(pm, batches[0]) - before).abs().max() <= 1e-5  # the init does not change the model
    for name, lp in p.active().items():
        layer = pm.base_model.model.get_submodule(name)
        s = layer.scaling["default"]
        assert s == pytest.approx(scaling(lp.alpha, lp.rank, method == "rslora"))
        w, a, b = layer.get_base_layer().weight.double(), lp.lora_A.double(), lp.lora_B.double()
        w0 = original[name]
        assert lp.residual == (method in RESIDUAL)
        if lp.residual:  # W_res + s·B·A = W
            assert float((w + s * b @ a - w0).norm() / w0.norm()) <= 1e-5
        else:
            assert torch.equal(w, w0) and torch.count_nonzero(b) == 0
        _check_method(method, opts, w0, a, b, s, stats, name)
    _perturb(pm)
    trained = _out(pm, batches[0])
    out = rw.export(pm, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(make(), out).eval()  # a freshly built, unmodified base
    assert (_out(loaded, batches[0]) - trained).abs().max() <= 1e-4
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_rslora"] == (method == "rslora")
    if method in RESIDUAL:
        assert set(cfg["rank_pattern"].values()) == {8}  # rank 2r on the original base
        assert "converted" in json.loads((out / "rankwise.json").read_text())


def _check_method(method, opts, w0, a, b, s, stats, name):
    """Each method's own defining property, against brute force on W (and C for CorDA)."""
    r = a.shape[0]
    if method in ("pissa", "milora"):
        u, sv, vh = torch.linalg.svd(w0, full_matrices=False)
        sl = slice(0, r) if method == "pissa" else slice(len(sv) - r, len(sv))
        if opts.get("niter"):  # randomized (q = r): approximate by design; on these flat random spectra it
            # still captures most of the optimal energy Σσ_i² (its subspace is checked on decaying spectra below)
            assert float((s * b @ a).square().sum()) >= 0.8 * float(sv[sl].square().sum())
        else:
            assert subspace_cos2(a, vh[sl]) >= 1 - 1e-8 and subspace_cos2(b.T, u[:, sl].T) >= 1 - 1e-8
            assert torch.allclose(s * b @ a, u[:, sl] @ torch.diag(sv[sl]) @ vh[sl], atol=1e-5)
    elif method == "olora":
        assert torch.allclose(b.T @ b, torch.eye(r, dtype=b.dtype), atol=1e-5)  # orthonormal columns of Q
        q, rr = torch.linalg.qr(w0)
        assert subspace_cos2(b.T, q[:, :r].T) >= 1 - 1e-8
    elif method == "corda":
        from rankwise.numerics.lowrank import dampened_inverse

        st = stats[name]
        fixed, inv, _ = dampened_inverse(st.xtx / st.n)
        u, sv, vh = torch.linalg.svd(w0 @ fixed, full_matrices=False)
        sl = slice(0, r) if opts["mode"] == "ipm" else slice(len(sv) - r, len(sv))
        assert torch.allclose(s * b @ a, u[:, sl] @ torch.diag(sv[sl]) @ vh[sl] @ inv, atol=1e-4, rtol=1e-4)


def test_corda_dampening_is_said_in_the_plan():
    model = tiny_llama()
    batches = make_batches(n_batches=1, batch=1, seq=8, pad_last=False)  # 8 tokens for 64 channels: C is singular
    p, _ = _plan(model, "corda", batches)
    notes = {lp.note for lp in p.active().values()}
    assert all("dampened" in n for n in notes) and any("ill-conditioned" in n for n in notes)
    assert "dampened" in json.dumps(p.to_dict())


# --- agreement with peft 0.21 ------------------------------------------------------------------------------

def _decaying(model, seed=0):
    """Give every linear weight a decaying spectrum (σ_i = 0.5^i), so that the top-r subspace is well defined
    and a randomized SVD with q = r (peft's pissa_niter_N) finds it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                out, inp = m.weight.shape
                k = min(out, inp)
                u = torch.linalg.qr(torch.randn(out, k, generator=g)).Q
                v = torch.linalg.qr(torch.randn(inp, k, generator=g)).Q
                m.weight.copy_(u @ torch.diag(0.5 ** torch.arange(k, dtype=torch.float32)) @ v.T)
    return model


def _peft_model(model, init, **extra):
    from peft import LoraConfig, get_peft_model

    names = rw.find_targets(model)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=names, init_lora_weights=init, **extra))


@pytest.mark.parametrize("method,peft_init", [("pissa", "pissa"), ("olora", "olora")])
def test_agrees_with_peft(method, peft_init):
    theirs = _peft_model(_decaying(tiny_llama()), peft_init)
    ours = rw.adapt_(_decaying(tiny_llama()), _plan(_decaying(tiny_llama()), method, make_batches())[0])
    _compare(ours, theirs)


def test_randomized_pissa_agrees_with_peft():
    """pissa_niter_4: both are randomized SVDs with q = r, but peft draws from the global RNG and ours from a
    fixed per-layer seed (reproducible runs), so the residuals differ by the sketch. The sketch's error is
    heavy-tailed per layer (single layers of either reach 2 % of ‖W‖), so the test compares distributions:
    over 4 seeds × 14 layers the median distance to the exact PiSSA residual must be within 2× of peft's
    (both ways), and the adapters' subspaces must agree with peft's (median cos² ≥ 0.99)."""
    import statistics

    names = rw.find_targets(tiny_llama())
    exact = rw.adapt_(_decaying(tiny_llama()), _plan(_decaying(tiny_llama()), "pissa", make_batches())[0])

    def layer(m, n):
        return m.base_model.model.get_submodule(n)

    def errors(m):
        return [float((layer(m, n).get_base_layer().weight.double() - layer(exact, n).get_base_layer().weight.double()).norm())
                for n in names]

    ours_err, theirs_err, cos2 = [], [], []
    for seed in range(4):
        torch.manual_seed(seed)
        theirs = _peft_model(_decaying(tiny_llama()), "pissa_niter_4")
        ours = rw.adapt_(_decaying(tiny_llama()), _plan(_decaying(tiny_llama()), "pissa", make_batches(), niter=4, seed=seed)[0])
        ours_err += errors(ours)
        theirs_err += errors(theirs)
        cos2 += [subspace_cos2(layer(ours, n).lora_A["default"].weight, layer(theirs, n).lora_A["default"].weight) for n in names]
    mo, mt = statistics.median(ours_err), statistics.median(theirs_err)
    assert mo <= 2 * mt and mt <= 2 * mo  # the same sketch quality (≈2.5e-4 here, of ‖W‖ ≈ 1.15)
    assert statistics.median(cos2) >= 0.99


def _compare(ours, theirs, tol=1e-5):
    for name in rw.find_targets(tiny_llama()):  # (on the adapted model the LoRA layers' children are linear too)
        a = ours.base_model.model.get_submodule(name)
        b = theirs.base_model.model.get_submodule(name)
        assert subspace_cos2(a.lora_A["default"].weight, b.lora_A["default"].weight) >= 0.99, name
        wa, wb = a.get_base_layer().weight.double(), b.get_base_layer().weight.double()
        w = wb + b.scaling["default"] * b.lora_B["default"].weight.double() @ b.lora_A["default"].weight.double()
        # the same residual base weight, relative to W: peft works in float32 (≈1e-7·‖W‖ rounding), ours in
        # float64, and on these decaying spectra W_res itself is ~5 % of W, so ‖W_res‖ would magnify both
        assert float((wa - wb).norm() / w.norm()) <= (tol[name] if isinstance(tol, dict) else tol), name


def _float32_inverse_tolerance(model, batch) -> dict[str, float]:
    """peft inverts the dampened covariance C + λI (λ = 0.01·mean diag C) in float32, ours in float64: the
    residual then carries that inverse's relative error, up to ε₃₂·κ(C + λI) to first order (×2: C and
    its inverse each rounded). Tiny random layers reach κ ≈ 4e3 (o_proj), so a flat bound cannot hold."""
    stats = rw.calibrate(model, batch, keep="full", progress=False)
    tol = {}
    for name in rw.find_targets(model):
        st = stats[stats.aliases.get(name, name)]
        c = st.xtx.double() / st.n
        lam = 0.01 * float(c.diagonal().mean())
        ev = torch.linalg.eigvalsh(c).clamp_min(0)
        tol[name] = 2 * 2.0**-24 * float((ev[-1] + lam) / (ev[0] + lam))
    return tol


def test_corda_agrees_with_peft():
    """peft's preprocess_corda needs batches of one sequence and divides each by its largest activation;
    with one calibration sequence that is a constant factor on C, which changes no direction and no W_res."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    batch = make_batches(n_batches=1, batch=1, seq=64, pad_last=False)
    base = tiny_llama()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=rw.find_targets(base), init_lora_weights="corda",
                     corda_config=CordaConfig(corda_method="ipm"))
    preprocess_corda(base, cfg, run_model=lambda: base(input_ids=batch[0]["input_ids"]))
    theirs = get_peft_model(base, cfg)
    model = tiny_llama()
    tol = _float32_inverse_tolerance(tiny_llama(), batch)
    ours = rw.adapt_(model, _plan(model, "corda", batch, mode="ipm")[0])
    _compare(ours, theirs, tol=tol)


# --- one calibration for many methods, none for data-free ones -------------------------------------------

def test_one_calibration_serves_eva_and_corda_and_none_for_data_free():
    model, batches = tiny_llama(), make_batches(n_batches=3)
    calls = []
    model.model.embed_tokens.register_forward_pre_hook(lambda m, a: calls.append(1))
    keep = keep_for(["eva", "corda"], rank=4, rho=2.0)
    assert keep == "full"
    stats = rw.calibrate(model, batches, keep=keep, progress=False)
    assert len(calls) == len(batches)  # one pass over the data (block-wise: its prefix runs once per batch)
    pe = rw.plan(stats, model, method="eva", rank=4)
    pc = rw.plan(stats, model, method="corda", rank=4)
    assert len(calls) == len(batches)  # planning runs no model
    assert sum(lp.rank for lp in pe.layers.values()) == sum(lp.rank for lp in pc.layers.values()) == 4 * 14
    assert keep_for(["lora", "rslora", "pissa", "olora", "milora"], rank=4) is None
    assert keep_for(["eva"], rank=4, rho=2.0) == 8


@pytest.mark.parametrize("method", ["pissa", "olora", "milora", "rslora"])
def test_data_free_methods_never_calibrate(tiny_model_dir, tmp_path, monkeypatch, method):
    from rankwise.cli.jobs import InitJob, run_init

    def no_calibration(*a, **k):
        raise AssertionError(f"{method} needs no data; calibrate() must not run")

    monkeypatch.setattr(sys.modules["rankwise.calib.calibrate"], "calibrate", no_calibration)
    res = run_init(InitJob(model=str(tiny_model_dir), method=method, rank=2, out=tmp_path / "o"), progress=False)
    assert res["tokens"] == 0 and (tmp_path / "o" / "adapter_config.json").exists()


# --- method options: YAML, CLI, config show ----------------------------------------------------------------

def test_method_options_in_yaml_are_validated_by_the_method(tmp_path):
    from rankwise.cli.runs import load_config
    from rankwise.errors import ConfigError

    f = tmp_path / "run.yaml"
    f.write_text("init:\n  method: pissa\n  niter: 4\n")
    assert load_config(f).init.method_options() == {"niter": 4}
    f.write_text("init:\n  method: pissa\n  nitre: 4\n")
    with pytest.raises(ConfigError, match="unknown key 'nitre' for method 'pissa'; did you mean 'niter'"):
        load_config(f)
    f.write_text("init:\n  method: corda\n  mode: fast\n")
    with pytest.raises(ConfigError, match="mode"):
        load_config(f)
    f.write_text("init:\n  method: eva\n  niter: 4\n")
    with pytest.raises(ConfigError, match="unknown key 'niter' for method 'eva'"):
        load_config(f)


def test_cli_method_options_and_listing(tiny_model_dir, tmp_path):
    import yaml

    from test_cli import run

    r = run("methods")
    assert r.returncode == 0
    for name in all_methods():
        assert name in r.stdout
    r = run("config", "show", "--method", "pissa")
    assert r.returncode == 0 and "niter: null" in r.stdout and "# pissa: null: exact SVD" in r.stdout
    assert yaml.safe_load(r.stdout)["init"]["method"] == "pissa"
    r = run("init", "--model", tiny_model_dir, "--method", "pissa", "--init-opt", "niter=2", "--rank", "2", "--out",
            tmp_path / "o", "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "o" / "plan.json").read_text())["config"]["niter"] == 2
    r = run("init", "--model", tiny_model_dir, "--method", "pissa", "--init-opt", "nitr=2", "--out", tmp_path / "p", "--quiet")
    assert r.returncode == 2 and "did you mean 'niter'" in r.stderr


@pytest.mark.parametrize("method", METHODS)
def test_run_folder_and_rankwise_export_load_on_the_original_base(tiny_model_dir, tmp_path, method):
    from rankwise.cli.runs import load_config, run_train
    from transformers import AutoModelForCausalLM

    from test_cli import run

    out = tmp_path / "run"
    cfg = load_config(None, {"model": str(tiny_model_dir), "out": str(out), "data.seq_len": 32, "data.max_train_examples": 16,
                             "data.max_eval_examples": 4, "init.method": method, "init.rank": 2, "init.calib_samples": 8,
                             "train.steps": 3, "train.lr": 1e-2})
    run_train(cfg, progress=False, log=lambda *a: None)
    r = run("export", out / "adapter", "--out", tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    ids = torch.randint(3, 200, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        on_original = PeftModel.from_pretrained(rw.load_model(tiny_model_dir)[0], out / "adapter")(input_ids=ids).logits
        merged_cli = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=ids).logits
        merged_run = AutoModelForCausalLM.from_pretrained(out / "merged")(input_ids=ids).logits
        plain = rw.load_model(tiny_model_dir)[0](input_ids=ids).logits
    assert (on_original - merged_run).abs().max() <= 1e-4 and (merged_cli - merged_run).abs().max() <= 1e-4
    assert (on_original - plain).abs().max() > 1e-3  # training changed the model: the comparison means something


def test_every_method_is_documented_and_complete():
    for name, impl in all_methods().items():
        assert impl.summary and impl.needs in ("none", "spectrum", "moments") and impl.default_lr > 0, name
        assert get_init(name) is impl


def test_default_learning_rates_are_the_benchmarks_picks():
    """Each method whose sweeps are settled on both tasks of benchmarks/init_zoo.py has the rate that sweep picked
    (benchmarks/results/init_zoo.json, summary.defaults) as its default_lr; EVA's pick comes from its whitened
    row, whitening being its default."""
    from pathlib import Path

    picks = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/init_zoo.json").read_text())["summary"]["defaults"]
    assert {"lora", "eva"} <= set(picks)
    for method, d in picks.items():
        assert get_init(method).default_lr == pytest.approx(d["lr"]), method
    assert picks["eva"]["row"] == "eva-whiten" and get_init("eva").config().whiten


@pytest.mark.parametrize("method", sorted(all_methods()))
def test_config_show_method_round_trips(method, tmp_path):
    """`config show --method NAME` for every method: valid YAML, each own key commented, loads back as is."""
    import yaml

    from rankwise.cli.configdoc import commented_yaml, method_keys, with_method
    from rankwise.cli.runs import RunConfig, load_config

    text = commented_yaml(with_method(RunConfig(), method))
    (tmp_path / "run.yaml").write_text(text)
    cfg = load_config(tmp_path / "run.yaml")
    assert cfg.init.method == method and yaml.safe_load(text)["init"]["method"] == method
    for key, (default, description) in method_keys(method).items():
        assert f"# {method}: {description}" in text and cfg.init.model_dump()[key] == default
