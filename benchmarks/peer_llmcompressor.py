"""llm-compressor as a peer for the quantization benchmark: GPTQ or AWQ on given calibration data.

Runs llm-compressor's `oneshot` on a local fp32 Hugging Face causal LM (CPU) with exactly the
calibration tensors it is given, then writes the *dequantized* (fake-quantized) fp32 weights
to a safetensors file, so that the main benchmark (benchmarks/quantize.py, written
separately) can load them into its own copy of the model and score them with its own
perplexity code, the same way it scores rankwise's quantizers.

This script must run with the peer venv's python (benchmarks/.venv-llmc, built by
benchmarks/setup_peer.sh), never the project's .venv: llm-compressor pins its own
transformers / compressed-tensors. It does not import rankwise.

    bash benchmarks/setup_peer.sh
    benchmarks/.venv-llmc/bin/python benchmarks/peer_llmcompressor.py \
        --model /root/.cache/rankwise/models/SmolLM2-135M-Instruct.Q4_1-<hash> \
        --calib calib.pt --method gptq --bits 4 --group-size 32 --symmetric \
        --out gptq.safetensors --json gptq.json

--calib is a torch.save'd dict {"input_ids": LongTensor[n, seq], "attention_mask":
LongTensor[n, seq]}. The rows go to oneshot in their given order, one per batch
(batch_size=1, no shuffling), through a plain DataLoader (oneshot uses a DataLoader as is;
a datasets.Dataset would go through its LengthAwareSampler, whose argsort over equal lengths
fixes no order).

Methods (llm-compressor 0.14):
  gptq: GPTQModifier(targets="Linear", ignore=["lm_head"], config_groups built from an
        explicit QuantizationArgs(num_bits, strategy="group", group_size, symmetric),
        dampening_frac=0.01, block_size=128, actorder=None unless --actorder weight).
        Its scales/zero points come from a min-max observer over each group of the layer's
        weight before the GPTQ sweep (not recomputed from the error-updated weights).
        --actorder group is refused: llm-compressor 0.14 removed it.
  awq:  AWQModifier (a smoothing transform; mappings inferred by llm-compressor for the
        architecture, duo_scaling=True, n_grid=20: its defaults) followed by a
        QuantizationModifier (round-to-nearest with min-max group scales) with the same
        QuantizationArgs. llm-compressor's AWQ examples use the asymmetric W4A16_ASYM scheme,
        so the default here is asymmetric for awq (symmetric for gptq); --symmetric /
        --asymmetric override it.

--out holds, keyed as in the original model's state_dict:
  gptq: the fake-quantized fp32 weight of every quantized Linear ("...q_proj.weight", ...).
  awq:  the whole state_dict after oneshot (AWQ folds its scales into the norms and the
        previous Linears), quantized Linears replaced by their fake-quantized weights,
        without llm-compressor's weight_scale / weight_zero_point / ... tensors and
        without lm_head.weight when it is tied to the embedding (as in model.safetensors).
With no accelerator, llm-compressor's pinning of cached activations (which AWQ calls and a
CPU-only torch refuses) is made a no-op: see allow_cpu_only_awq.
Each quantized weight is checked to lie on its grid (w / scale + zero_point within 1e-4 of an
integer in [qmin, qmax]) before it is written; the script fails otherwise.

--json: {"method", "bits", "group_size", "symmetric", "actorder", "seconds" (the oneshot call
only, time.perf_counter), "versions", "n_quantized_layers", ...} plus the settings used.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

GRID_TOL = 1e-4
QPARAM_SUFFIXES = ("_scale", "_zero_point", "_g_idx", "_global_scale")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        required=True,
        type=Path,
        help="local HF folder (config.json + safetensors)",
    )
    p.add_argument(
        "--calib",
        required=True,
        type=Path,
        help=".pt dict with input_ids, attention_mask [n, seq]",
    )
    p.add_argument("--method", required=True, choices=["gptq", "awq"])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=32)
    sym = p.add_mutually_exclusive_group()
    sym.add_argument(
        "--symmetric",
        dest="symmetric",
        action="store_true",
        default=None,
        help="default for gptq",
    )
    sym.add_argument(
        "--asymmetric",
        dest="symmetric",
        action="store_false",
        help="default for awq (llm-compressor's W4A16_ASYM)",
    )
    p.add_argument(
        "--actorder",
        choices=["none", "weight", "group"],
        default="none",
        help="gptq only; 'group' was removed in llm-compressor 0.14 and is refused",
    )
    p.add_argument("--dampening-frac", type=float, default=0.01, help="gptq only")
    p.add_argument("--out", required=True, type=Path, help="output .safetensors")
    p.add_argument("--json", required=True, type=Path, help="output .json")
    args = p.parse_args(argv)
    if args.symmetric is None:
        args.symmetric = args.method == "gptq"
    if args.method != "gptq" and args.actorder != "none":
        p.error("--actorder applies to gptq only")
    if args.actorder == "group":
        p.error(
            "--actorder group: llm-compressor 0.14 removed group activation ordering "
            "(QuantizationArgs rejects it); use none or weight"
        )
    return args


def load_calibration(path: Path):
    data = torch.load(path, map_location="cpu")
    ids = torch.as_tensor(data["input_ids"]).long()
    mask = torch.as_tensor(data.get("attention_mask", torch.ones_like(ids))).long()
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise SystemExit(
            f"{path}: input_ids / attention_mask must be [n, seq] of one shape, "
            f"got {tuple(ids.shape)} / {tuple(mask.shape)}"
        )
    return ids, mask


def build_recipe(args):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(
        num_bits=args.bits,
        type="int",
        strategy="group",
        group_size=args.group_size,
        symmetric=args.symmetric,
        dynamic=False,
    )
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    settings = {"observer": "memoryless_minmax (llm-compressor's default for weights)"}
    if args.method == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        mod = GPTQModifier(
            config_groups=groups,
            ignore=["lm_head"],
            dampening_frac=args.dampening_frac,
            actorder=None if args.actorder == "none" else args.actorder,
        )
        settings.update(dampening_frac=mod.dampening_frac, block_size=mod.block_size)
        return [mod], settings

    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    # llm-compressor's defaults: inferred mappings, duo_scaling, n_grid
    awq = AWQModifier()
    quant = QuantizationModifier(config_groups=groups, ignore=["lm_head"])
    settings.update(duo_scaling=awq.duo_scaling, n_grid=awq.n_grid)
    return [awq, quant], settings


def quantized_modules(model):
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if (
            scheme is not None
            and getattr(scheme, "weights", None) is not None
            and hasattr(module, "weight_scale")
        ):
            yield name, module


@torch.no_grad()
def dequantized_weight(module) -> torch.Tensor:
    """The weight as the quantized module uses it in its forward: fake_quantize(weight)."""
    from compressed_tensors.quantization import forward_quantize

    w = module.weight.detach().float()
    return (
        forward_quantize(module, w, "weight", module.quantization_scheme.weights)
        .float()
        .contiguous()
    )


@torch.no_grad()
def grid_deviation(w: torch.Tensor, module) -> float:
    """Largest distance of w / scale + zero_point from an integer in [qmin, qmax] (group-wise)."""
    from compressed_tensors.quantization.utils import calculate_range

    qargs = module.quantization_scheme.weights
    scale = module.weight_scale.detach().double()
    zp = getattr(module, "weight_zero_point", None)
    zp = torch.zeros_like(scale) if zp is None else zp.detach().double()
    rows, cols = w.shape
    g = qargs.group_size
    if scale.shape != (rows, cols // g) or cols % g:
        raise RuntimeError(
            f"unexpected scale shape {tuple(scale.shape)} for weight {tuple(w.shape)}, g={g}"
        )
    q = w.double().reshape(rows, cols // g, g) / scale.unsqueeze(-1) + zp.unsqueeze(-1)
    qmin, qmax = (float(x) for x in calculate_range(qargs, w.device))
    off_int = (q - q.round()).abs().max().item()
    off_range = max(0.0, qmin - q.min().item(), q.max().item() - qmax)
    return max(off_int, off_range)


def allow_cpu_only_awq() -> bool:
    """Make llm-compressor 0.14's AWQ run on a machine with no accelerator.

    AWQModifier._apply_smoothing pins its cached layer inputs
    (IntermediatesCache.pin_memory) before the grid search; on a CPU-only torch,
    Tensor.pin_memory() raises "Cannot access accelerator device when none is available".
    Pinning only speeds host-to-device copies, and with no device every tensor stays in
    host memory, so skipping it changes no result. Returns whether the patch was applied.
    """
    if torch.accelerator.is_available():
        return False
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)

    from llmcompressor import oneshot
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids, mask = load_calibration(args.calib)
    n, seq = ids.shape
    rows = [{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(n)]
    # Default collate stacks each row to [1, seq]; order kept, one sample per batch.
    loader = torch.utils.data.DataLoader(rows, batch_size=1, shuffle=False)

    model = AutoModelForCausalLM.from_pretrained(
        str(args.model), dtype=torch.float32, device_map=None
    )
    model.eval()
    # oneshot loads a processor when given none, and fails without one; load it outside the timing.
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}

    recipe, settings = build_recipe(args)
    pin_memory_patched = allow_cpu_only_awq()
    mappings = None
    if args.method == "awq":
        from llmcompressor.modifiers.transform.awq import get_layer_mappings_from_model

        mappings = [
            {"smooth_layer": m.smooth_layer, "balance_layers": list(m.balance_layers)}
            for m in get_layer_mappings_from_model(model)
        ]

    t0 = time.perf_counter()
    model = oneshot(
        model=model,
        processor=tokenizer,
        recipe=recipe,
        dataset=loader,
        num_calibration_samples=n,
        max_seq_length=seq,
        shuffle_calibration_samples=False,
        batch_size=1,
    )
    seconds = time.perf_counter() - t0

    out: dict[str, torch.Tensor] = {}
    qnames = []
    worst = 0.0
    idempotent_worst = 0.0
    for name, module in quantized_modules(model):
        w = dequantized_weight(module)
        dev = grid_deviation(w, module)
        worst = max(worst, dev)
        if dev > GRID_TOL:
            raise SystemExit(f"{name}: dequantized weight is off its grid by {dev:.3g}")
        # the in-place weight after GPTQ is already on the grid: fake-quantizing changes nothing
        idempotent_worst = max(
            idempotent_worst,
            (w - module.weight.detach().float()).abs().max().item()
            if args.method == "gptq"
            else 0.0,
        )
        out[f"{name}.weight"] = w
        qnames.append(name)
        qargs = module.quantization_scheme.weights
    if not qnames:
        raise SystemExit("no quantized Linear found after oneshot")

    changed_other = []
    if args.method == "awq":
        qprefixes = set(qnames)
        embed_ptr = model.get_input_embeddings().weight.data_ptr()
        for key, value in model.state_dict().items():
            mod_name, _, attr = key.rpartition(".")
            if (
                mod_name in qprefixes
                and attr != "weight"
                and attr.endswith(QPARAM_SUFFIXES)
            ):
                continue  # llm-compressor's qparams
            if key in out:
                continue
            if key not in original:
                raise SystemExit(
                    f"unexpected tensor in the state_dict after oneshot: {key}"
                )
            if tied and key == "lm_head.weight" and value.data_ptr() == embed_ptr:
                continue  # tied to the embedding, as in model.safetensors
            out[key] = value.detach().float().contiguous().clone()
            if not torch.equal(out[key], original[key]):
                changed_other.append(key)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        out,
        str(args.out),
        metadata={"method": args.method, "producer": "llmcompressor"},
    )

    result = {
        "method": args.method,
        "bits": args.bits,
        "group_size": args.group_size,
        "symmetric": args.symmetric,
        "actorder": args.actorder if args.method == "gptq" else None,
        "seconds": seconds,
        "versions": {
            "llmcompressor": version("llmcompressor"),
            "compressed_tensors": version("compressed-tensors"),
            "transformers": version("transformers"),
            "torch": torch.__version__,
        },
        "n_quantized_layers": len(qnames),
        "n_tensors_saved": len(out),
        "calibration": {"n": n, "seq": seq, "batch_size": 1, "shuffle": False},
        "settings": settings,
        "weight_args": qargs.model_dump(mode="json"),  # as resolved by llm-compressor
        "grid_check": {"max_deviation": worst, "tol": GRID_TOL},
        "torch_threads": torch.get_num_threads(),
        "pin_memory_patched": pin_memory_patched,
    }
    if args.method == "gptq":
        result["max_abs_change_on_requantizing"] = idempotent_worst
    if args.method == "awq":
        result["settings"]["mappings"] = mappings
        result["changed_non_quantized_tensors"] = len(changed_other)
        result["changed_non_quantized_examples"] = changed_other[:6]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{args.method}: oneshot {seconds:.1f}s, {len(qnames)} quantized layers, "
        f"grid deviation {worst:.2e}, wrote {args.out} ({len(out)} tensors) and {args.json}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
