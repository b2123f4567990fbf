"""`python -m worker.kernels`: build the compiled kernels for this machine now (the Makefile runs it)."""

import sys
import time

from worker.kernels import build_name, load

t = time.perf_counter()
ok = load()
print(f"{'built' if ok else 'NOT built'}: {build_name()} in {time.perf_counter() - t:.1f} s")
sys.exit(0 if ok else 1)
