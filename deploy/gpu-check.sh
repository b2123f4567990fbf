#!/usr/bin/env bash
# The GPU checks of issue 19 in one command, for a lent GPU machine (bare: the image's python3 with
# torch, transformers and triton; no ray, no redis-py). Run from the repo root:
#     bash deploy/gpu-check.sh          (the device tool: carry [".whl"]; $OUT comes back)
# What the image lacks travels as wheels in .whl/ (`make gpu-wheels` puts them there). Then: the
# CUDA tests (exactness on the device, the Triton kernel compiled, the device checks), and
# `python -m cluster.bench.gpu` (closed loop, max_running=1, decode step against its roofline),
# whose report and raw numbers land in $OUT. About 3-5 minutes on an H100; each part has its own
# time limit so the whole stays under 8. GPU_BENCH_ARGS="--size tiny --device cpu" tries it anywhere.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
nvidia-smi -L || true
# The APIs the engine relies on, in this image's transformers (the import fails loudly where one is gone).
python3 -c "import torch, transformers, worker.engine; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" || exit 1
timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="-ra" \
  tests/worker/test_exactness_cuda.py tests/worker/test_cuda_graphs.py tests/worker/test_triton_paged.py tests/worker/test_models.py 2>&1 | tee "$OUT/cuda-tests.log"
tests=${PIPESTATUS[0]}
timeout 420 python3 -m cluster.bench.gpu --out "$OUT" ${GPU_BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
bench=${PIPESTATUS[0]}
echo "cuda tests: exit $tests; bench: exit $bench"
exit $((tests != 0 || bench != 0))
