"""SVD compression, mixed precision and the joint planner on tiny models; the knapsack against brute force."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from conftest import make_batches, tiny_bert, tiny_llama

from rankwise.calib.calibrate import calibrate
from rankwise.compress import (LowRankLinear, compress, compress_planned, lowrank_layers, mixed_precision,
                               parse_size)
from rankwise.compress.svd import uniform_ranks
from rankwise.errors import ConfigError, RankwiseError
from rankwise.numerics.lowrank import lowrank_fit
from rankwise.plan.knapsack import BudgetError, Option, allocate, total
from rankwise.quant.linear import quantized_layers


def logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches])


def calib():
    return make_batches(n_batches=4, batch=4, seq=32)


# ---- the knapsack ---------------------------------------------------------------------------------------

def convex_instance(rng: random.Random, layers: int, points: int) -> dict[str, list[Option]]:
    """Decreasing convex error curves at random integer costs (what σ² tails look like)."""
    out = {}
    for li in range(layers):
        costs = sorted(rng.sample(range(1, 40), points))
        e, errs, step = rng.uniform(1, 10), [], rng.uniform(0.3, 3)
        for _ in costs:
            errs.append(e)
            e, step = max(e - step, 0), step * rng.uniform(0.3, 0.9)
        out[f"l{li}"] = [Option(c, v, (li, j)) for j, (c, v) in enumerate(zip(costs, errs))]
    return out


def brute_force(options, budget) -> float:
    best = float("inf")
    for pick in itertools.product(*options.values()):
        c, e = sum(o.cost for o in pick), sum(o.error for o in pick)
        if c <= budget:
            best = min(best, e)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_knapsack_meets_the_budget_and_is_near_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    options = convex_instance(rng, layers=3, points=5)
    low = sum(min(o.cost for o in v) for v in options.values())
    budget = low + rng.randint(0, 60)
    got = allocate(options, budget)
    cost, err = total(got)
    assert cost <= budget
    # The greedy's classical bound on convex curves: no worse than the optimum with one segment less to spend.
    biggest_step = max(b.cost - a.cost for v in options.values() for a, b in zip(v, v[1:]))
    assert brute_force(options, budget) - 1e-9 <= err <= brute_force(options, max(budget - biggest_step, low)) + 1e-9


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_returns_a_better_candidate_it_is_given(seed):
    rng = random.Random(100 + seed)
    options = convex_instance(rng, layers=4, points=6)
    for j in range(6):  # "uniform": every layer at its j-th option
        uniform = {n: v[j] for n, v in options.items()}
        budget = total(uniform)[0]
        assert total(allocate(options, budget, candidates=[uniform]))[1] <= total(uniform)[1] + 1e-12


def test_knapsack_names_the_smallest_reachable_size():
    options = {"a": [Option(10, 1.0, 0), Option(20, 0.0, 1)], "b": [Option(5, 1.0, 0)]}
    with pytest.raises(BudgetError, match="smallest reachable size is 15"):
        allocate(options, 12)


# ---- the error curves -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["svd", "asvd", "svd-llm"])
def test_output_error_curve_equals_the_direct_computation(kind):
    torch.manual_seed(0)
    x = torch.randn(300, 24, dtype=torch.float64) * torch.logspace(0, 2, 24, dtype=torch.float64)
    gram = x.T @ x / 300
    w = torch.randn(16, 24, dtype=torch.float64)
    weight = {"svd": None, "asvd": torch.diag(x.abs().mean(0)), "svd-llm": gram}[kind]
    fit = lowrank_fit(w, weight)
    curve = fit.output_errors(gram)
    for k in range(0, 17, 3):
        d = w - fit.weight(k)
        assert float(curve[k]) == pytest.approx(float(torch.trace(d @ gram @ d.T)), rel=1e-8, abs=1e-10)
    with pytest.raises(ValueError, match="full fit"):
        lowrank_fit(w, weight, k=4).output_errors(gram)


def test_balanced_factors_are_float16_exact_and_reproduce_the_fit():
    torch.manual_seed(1)
    w = torch.randn(20, 30, dtype=torch.float64)
    fit = lowrank_fit(w)
    a, b = fit.balanced_factors(6)
    assert torch.equal(a, a.half().float()) and torch.equal(b, b.half().float())
    # float16 rounding of each factor: ~1e-3 relative, far below the rank-6 truncation itself
    assert ((b.double() @ a.double() - fit.weight(6)).norm() / fit.weight(6).norm()) < 2e-3


# ---- SVD compression ---------------------------------------------------------------------------------------

def summed_error(report) -> float:
    return sum(r.error for r in report.layers.values())


@pytest.mark.parametrize("ratio", [0.9, 0.6])
def test_svd_compression_meets_the_ratio_and_svd_llm_beats_plain_svd(ratio):
    batches = calib()
    errs = {}
    for method in ("svd", "asvd", "svd-llm"):
        model = tiny_llama()
        report = compress(model, batches, method, ratio=ratio, progress=False)
        after, before = report.params
        assert after <= ratio * before
        assert sum(m.n_params for m in lowrank_layers(model).values()) + sum(
            r.params for r in report.layers.values() if r.rank is None) == after
        errs[method] = summed_error(report)
    # whitening is the exact optimum of each layer's output error, plain SVD of none of them
    assert errs["svd-llm"] < errs["svd"]


def test_global_allocation_is_no_worse_than_uniform_on_its_objective():
    batches = calib()
    glob = compress(tiny_llama(), batches, "svd-llm", ratio=0.7, progress=False)
    uni = compress(tiny_llama(), batches, "svd-llm", ratio=0.7, allocation="uniform", progress=False)
    ranks = {n: r.rank for n, r in glob.layers.items()}
    assert len(set(ranks.values())) > 1  # not uniform
    assert glob.params[0] <= 0.7 * glob.params[1] and uni.params[0] <= 0.7 * uni.params[1]
    # the planned objective (errors on the original model's inputs) of each allocation
    assert sum(r.predicted for r in glob.layers.values()) <= summed_error(uni) * 1.02  # uni: measured, sequential
    assert summed_error(glob) < summed_error(uni)


def test_uniform_ranks_keep_each_layers_share():
    ranks = uniform_ranks({"a": (64, 64), "b": (32, 64)}, 0.5, 1)
    assert ranks == {"a": 16, "b": 10}


def first_input(module, store: dict, key: str):
    """Record every hidden-states input the module receives (the hook returns None: inputs unchanged)."""
    def hook(m, args, kwargs):
        store.setdefault(key, []).append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def test_compression_is_block_sequential():
    """Block 1 is planned on the original model's inputs (pass 1) and factored from the inputs the factored
    block 0 produces (pass 2, its last call)."""
    batches = calib()[:1]
    model, seen = tiny_llama(), {}
    h = first_input(model.model.layers[1], seen, "x")
    compress(model, batches, "svd-llm", ratio=0.5, progress=False)
    h.remove()
    want = {}
    factored0, ref = tiny_llama(), tiny_llama()
    factored0.model.layers[0] = model.model.layers[0]
    for m, key in ((factored0, "x"), (ref, "orig")):
        h = first_input(m.model.layers[1], want, key)
        calibrate(m, batches, r"re:.*layers\.1\.self_attn\.q_proj", progress=False)
        h.remove()
    assert (seen["x"][0] - want["orig"][0]).abs().max() <= 1e-6
    assert (seen["x"][-1] - want["x"][0]).abs().max() <= 1e-6
    assert (seen["x"][-1] - want["orig"][0]).abs().max() > 1e-4


def test_observe_only_step_sees_the_same_statistics_in_one_pass():
    batches = calib()
    model = tiny_llama()
    plain = calibrate(model, batches, progress=False)
    got = {}
    calls = []

    def step(names, stats):
        calls.append(names)
        for n in names:
            key = stats.aliases.get(n, n)
            got[key] = stats[key].xtx.clone()

    calibrate(model, batches, observe=("moments",), step=step, transforms=False, progress=False)
    assert len(calls) == 2  # once per block
    for k, xtx in got.items():
        assert torch.allclose(xtx, plain[k].xtx, rtol=1e-6, atol=1e-9), k


@pytest.mark.parametrize("build", [tiny_llama, tiny_bert])
def test_factored_folder_and_merged_folder_reload_to_the_same_outputs(tmp_path, build):
    from transformers import AutoModel

    from rankwise.export import export_model

    batches = calib()
    model = build()
    compress(model, batches, "svd-llm", ratio=0.6, progress=False)
    with torch.no_grad():
        ours = model(**batches[0])[0]
    export_model(model, tmp_path / "f", "factored", method="svd-llm")
    export_model(model, tmp_path / "m", "safetensors")
    import json
    assert "rankwise_lowrank" in json.loads((tmp_path / "f" / "config.json").read_text())
    assert "rankwise_lowrank" not in json.loads((tmp_path / "m" / "config.json").read_text())
    # the factored folder through rankwise's loader (tokenizer-less: build it directly)
    from transformers import AutoConfig

    from rankwise.compress import load_factored
    cls = type(model)
    back = load_factored(tmp_path / "f", cls, AutoConfig.from_pretrained(tmp_path / "f"))
    assert len(lowrank_layers(back)) == len(lowrank_layers(model))
    merged = (AutoModel if build is tiny_bert else cls).from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        # ≤ 1e-4, the acceptance bound: the same float32 factors, only the order of operations may differ
        assert (back(**batches[0])[0] - ours).abs().max() <= 1e-4
        assert (merged(**batches[0])[0] - ours).abs().max() <= 1e-4


def test_rankwise_load_model_reads_a_factored_bert_with_its_tokenizer(tmp_path, tiny_bert_dir):
    from rankwise.export import export_model
    from rankwise.models import load_model

    model, tok = load_model(tiny_bert_dir)
    batches = calib()
    compress(model, batches, "asvd", ratio=0.7, progress=False)
    export_model(model, tmp_path / "f", "factored", tokenizer=tok, method="asvd")
    back, tok2 = load_model(tmp_path / "f")
    assert len(lowrank_layers(back)) == len(lowrank_layers(model)) > 0 and tok2("a b").input_ids == tok("a b").input_ids
    with torch.no_grad():
        assert (back(**batches[0])[0] - model(**batches[0])[0]).abs().max() <= 1e-4
    with pytest.raises(RankwiseError, match="reloads only as that architecture"):
        load_model(tmp_path / "f", task="seq-cls")


def test_fixed_rank_keeps_layers_dense_where_factors_would_not_be_smaller():
    report = compress(tiny_llama(), calib(), "svd-llm", rank=32, progress=False)
    ranks = {n.rsplit(".", 1)[1]: r.rank for n, r in report.layers.items()}
    assert ranks["q_proj"] is None and ranks["gate_proj"] == 32  # 32·128 ≥ 64·64; 32·160 < 96·64
    assert all(r.predicted is None for r in report.layers.values() if r.rank is not None)  # not planned: no curve


def test_svd_bad_input():
    with pytest.raises(ConfigError, match="smallest reachable is"):
        compress(tiny_llama(), calib(), "svd-llm", ratio=0.001, progress=False)
    with pytest.raises(ConfigError, match="above model.layers.0.self_attn.k_proj's width"):
        compress(tiny_llama(), calib(), "svd", rank=40, targets="k_proj", progress=False)
    with pytest.raises(ConfigError, match="not both"):
        compress(tiny_llama(), calib(), "svd", rank=4, ratio=0.5, progress=False)
    with pytest.raises(ConfigError, match="method"):
        compress(tiny_llama(), calib(), "tsvd", ratio=0.5, progress=False)


# ---- mixed precision and the joint planner --------------------------------------------------------------------

def test_mixed_precision_meets_the_average_bits_and_applies_the_plan():
    model = tiny_llama()
    report = mixed_precision(model, calib(), avg_bits=3.0, bits=[2, 3, 4, 8], group_size=32, progress=False)
    numel = sum(c.numel for c in report.layers.values())
    assert report.bytes * 8 / numel <= 3.0 + 1e-9
    q = quantized_layers(model)
    assert set(q) == set(report.layers)
    for n, c in report.layers.items():
        assert q[n].grid.bits == c.bits and q[n].lora_a is None
    assert len({c.bits for c in report.layers.values()}) > 1  # 3.0 sits between the 2.5 and 3.5 grids
    for bits, cost, err in report.uniform:  # no worse than any uniform grid that fits, on the predicted error
        if cost <= report.budget:
            assert sum(c.predicted for c in report.layers.values()) <= err + 1e-12


def test_the_lowest_width_is_held_back_while_the_budget_allows():
    batches = calib()
    held = mixed_precision(tiny_llama(), batches, avg_bits=3.7, group_size=32, progress=False)  # 3-bit g32: 3.5
    assert min(c.bits for c in held.layers.values()) >= 3
    free = mixed_precision(tiny_llama(), batches, avg_bits=3.7, group_size=32, lowest_bits_last=False, progress=False)
    # without the rule the knapsack is free to use 2 bits, and on its own objective it does at least as well
    assert sum(c.predicted for c in free.layers.values()) <= sum(c.predicted for c in held.layers.values()) + 1e-12


def test_joint_planner_meets_a_byte_budget_with_compensation_and_svd():
    model = tiny_llama()
    budget = 24000
    report = compress_planned(model, calib(), budget=budget, ranks=[0, 4, 8], svd=True, group_size=32, progress=False)
    assert report.bytes <= budget
    d = report.to_dict()
    assert d["measured"] is not None and d["measured"] > 0 and len(d["curve"]) == 12
    for n, c in report.layers.items():
        m = model.get_submodule(n)
        if c.kind == "svd":
            assert isinstance(m, LowRankLinear) and m.rank == c.rank
        else:
            assert m.grid.bits == c.bits and (m.lora_a is None) == (c.rank == 0)
    # the stored bytes are what the modules hold: codes, fp16 scales, fp16 factors
    stored = sum(m.bits_per_weight * m.codes.numel() / 8 for m in quantized_layers(model).values())
    stored += sum(2 * m.n_params for m in lowrank_layers(model).values())
    assert stored == pytest.approx(report.bytes)


def test_joint_planner_factors_a_layer_that_is_low_rank():
    """A layer of exact rank 4 costs nothing in error as rank-8 factors: with room in the budget the planner
    factors it (zero error) rather than quantize it (some error)."""
    model = tiny_llama()
    lin = model.model.layers[0].mlp.gate_proj  # 96 × 64
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 4, generator=g) @ torch.randn(4, 64, generator=g) * 0.05)
    report = compress_planned(model, calib(), budget=1e6, ranks=[0, 8], svd=True, group_size=32, progress=False)
    choice = report.layers["model.layers.0.mlp.gate_proj"]
    assert choice.kind == "svd" and isinstance(model.model.layers[0].mlp.gate_proj, LowRankLinear)
    assert choice.measured < 1e-6
    assert sum(c.kind == "quant" for c in report.layers.values()) >= 10  # random full-rank layers stay quantized


def test_joint_planner_compensation_beats_bits_alone_where_it_is_chosen():
    batches = calib()
    plain = compress_planned(tiny_llama(), batches, budget=30000, ranks=[0], group_size=32, progress=False)
    joint = compress_planned(tiny_llama(), batches, budget=30000, ranks=[0, 2, 4, 8], group_size=32, progress=False)
    # more options under the same budget: the predicted objective can only go down
    assert joint.to_dict()["predicted"] <= plain.to_dict()["predicted"] + 1e-12


def test_joint_plan_exports_to_compressed_tensors_plus_a_compensation_adapter(tmp_path):
    from rankwise.export import export_model
    from rankwise.export.compressed_tensors import load_compensated

    batches = calib()
    model = tiny_llama()
    report = compress_planned(model, batches, budget=40000, ranks=[0, 4], group_size=32, progress=False)
    ranks = {c.rank for c in report.layers.values()}
    assert ranks == {0, 4}  # some layers compensated, some not: per-layer ranks in the adapter
    ours = logits(model, batches)
    out = export_model(model, tmp_path / "ct", "compressed-tensors")
    for n, rec in report.quant["layers"].items():  # measured on the apply pass's own calibration inputs
        if report.layers[n].rank:
            assert rec["compensated_error"] <= rec["error"] * (1 + 1e-6), n
    adapter = out / "compensation" / "adapter_model.safetensors"
    from safetensors.torch import load_file
    assert {t.dtype for t in load_file(adapter).values()} == {torch.float16}  # stored as counted: 2 bytes each
    back = load_compensated(out)  # transformers' loader, compressed-tensors' decompression, peft's adapter
    assert type(back).__name__.startswith("PeftModel")
    assert (logits(back, batches) - ours).abs().max() <= 1e-4


def test_mixed_bits_export_to_compressed_tensors_and_gguf(tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM

    from rankwise.export import export_model

    batches = calib()
    model = tiny_llama()
    report = mixed_precision(model, batches, avg_bits=6.0, bits=[4, 8], group_size=32, progress=False)
    assert {c.bits for c in report.layers.values()} == {4, 8}
    ours = logits(model, batches)
    ct = export_model(model, tmp_path / "ct", "compressed-tensors")
    import json
    groups = json.loads((ct / "config.json").read_text())["quantization_config"]["config_groups"]
    assert sorted(g["weights"]["num_bits"] for g in groups.values()) == [4, 8]
    back = AutoModelForCausalLM.from_pretrained(ct).eval()
    assert (logits(back, batches) - ours).abs().max() <= 1e-4
    path = export_model(model, tmp_path / "g", "gguf")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for n, c in report.layers.items():
        want = gguf.GGMLQuantizationType.Q4_0 if c.bits == 4 else gguf.GGMLQuantizationType.Q8_0
        assert types[names.get_name(n) + ".weight"] == want, n


def test_planner_bad_input():
    with pytest.raises(ConfigError, match="smallest reachable size is"):
        compress_planned(tiny_llama(), calib(), budget=1000, group_size=32, progress=False)
    with pytest.raises(ConfigError, match="smallest reachable is 2.500"):
        mixed_precision(tiny_llama(), calib(), avg_bits=2.0, group_size=32, progress=False)
    with pytest.raises(ConfigError, match="above model.layers.0.self_attn.q_proj's width"):
        compress_planned(tiny_llama(), calib(), budget=1e6, ranks=[0, 100], group_size=32, progress=False)
    with pytest.raises(ConfigError, match="exactly one"):
        compress_planned(tiny_llama(), calib(), budget=1e6, avg_bits=3, progress=False)
    with pytest.raises(ConfigError, match="set by the planner itself"):
        compress_planned(tiny_llama(), calib(), budget=1e6, options={"group_size": 32}, progress=False)
    with pytest.raises(ConfigError, match=r"smallest reachable size is 34,048 bytes .*\+ rank 4"):  # 19,200 + 2·4·Σ(in+out)
        compress_planned(tiny_llama(), calib(), budget=19_500, ranks=[4, 8], group_size=32, progress=False)
    with pytest.raises(RankwiseError, match="does not divide"):
        mixed_precision(tiny_llama(), calib(), group_size=48, progress=False)
    model = tiny_llama()
    compress(model, calib(), "svd-llm", ratio=0.7, progress=False)
    from rankwise.export import export_model
    with pytest.raises(ConfigError, match="cannot hold low-rank"):
        export_model(model, "/nonexistent/x", "compressed-tensors")


@pytest.mark.parametrize("text,value", [("60MB", 60e6), ("1.5 GB", 1.5e9), ("512MiB", 512 * 2**20), ("2048", 2048.0),
                                        ("10kb", 1e4)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["60 MBx", "MB", "-5MB", "1e"])
def test_parse_size_refuses_what_it_cannot_read(text):
    with pytest.raises(ConfigError, match="cannot read the size"):
        parse_size(text)
