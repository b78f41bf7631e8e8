#!/usr/bin/env bash
# Builds the llm-compressor peer venv for the quantization benchmark: benchmarks/.venv-llmc.
# It is separate from the project's .venv (llm-compressor pins its own transformers and
# compressed-tensors) and is only ever used through benchmarks/peer_llmcompressor.py as a subprocess.
#
# Idempotent: an existing venv is reused and pip only installs what is missing.
# torch==2.13.0 (a CPU build on local disk) goes in first and is pinned through a constraints
# file for the llmcompressor install, so pip can't swap it for a (multi-GB CUDA) build.
#
# Run: bash benchmarks/setup_peer.sh
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv-llmc"
TORCH_VERSION="2.13.0"
LLMC_VERSION="0.14.0.1"

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"

"$PY" -m pip install --quiet "torch==$TORCH_VERSION"
"$PY" -m pip install --quiet -c "$CONSTRAINTS" "llmcompressor==$LLMC_VERSION"

HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$PY" - <<EOF
import importlib.metadata as md
import torch
want = "$TORCH_VERSION"
if not torch.__version__.startswith(want):
    raise SystemExit(f"torch is {torch.__version__}, wanted {want}")
import llmcompressor, compressed_tensors, transformers  # noqa: F401  (they must import)
for name in ("llmcompressor", "compressed-tensors", "transformers", "torch", "datasets", "safetensors"):
    print(f"{name}=={md.version(name)}")
EOF
