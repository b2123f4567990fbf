"""Compiled kernels: the CPU ops `torch.ops.prefixcache.*` (paged attention, writing KV, the linear
layers' GEMM and the elementwise parts of a decoder layer that `worker.lean` calls), built once per machine.

The sources (`SOURCES`, with the header they share) are compiled with torch's own C++ extension tooling (g++, ninja) the first
time it is needed, or ahead of time by `python -m worker.kernels` (the Makefile runs it at install),
into torch's extension cache (`build_dir()`: `$TORCH_EXTENSIONS_DIR`, else ~/.cache/torch_extensions). The name carries a digest of the source, the torch
version and this CPU's instruction-set flags, because the build uses `-march=native`: a machine
with other flags (a node of another kind sharing the cache directory) builds its own.

`load()` returns False, with the reason logged, where no compiler is available: the engine
then attends with per-request SDPA (`Engine.info()["attention"]` names what runs).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)
_HERE = Path(__file__).parent
SOURCES = (_HERE / "paged_attention_cpu.cpp", _HERE / "layer_ops_cpu.cpp", _HERE / "linear_cpu.cpp")
HEADERS = (_HERE / "simd.h",)
# -fopenmp: at::parallel_for is inline OpenMP, which compiles to one thread without it (measured:
# the op ran 1.6x slower on 2 cores). Nothing links libgomp: its symbols resolve to torch's own.
OPS = ("paged_attention", "write_kv", "rms_norm", "add_rms_norm", "rope", "silu_mul", "pack_linear", "linear")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"]
# A build holds `lock` in its directory while it runs (torch's FileBaton) and other processes wait
# for the file to go; a build killed mid-way (Ctrl-C in the first `make`, a killed CI run) leaves it,
# and every later start would wait forever. A build takes 1-2 minutes on 2 cores.
STALE_LOCK_S = 15 * 60


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def build_name() -> str:
    digest = hashlib.sha256()
    files = [p.read_bytes() for p in (*SOURCES, *HEADERS)]
    for part in (*files, torch.__version__.encode(), _cpu_flags().encode(), " ".join(FLAGS).encode()):
        digest.update(part)
    return f"prefixcache_kernels_{digest.hexdigest()[:12]}"


def _put_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; the `ninja` wheel's binary is not there unless the venv is
    activated (a Ray worker, `.venv/bin/python` run directly)."""
    try:
        import ninja
    except ImportError:
        return
    bin_dir = getattr(ninja, "BIN_DIR", None)
    path = os.environ.get("PATH", "")
    if bin_dir and bin_dir not in path.split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + path


def build_dir() -> Path:
    """Where the ops are built: `$TORCH_EXTENSIONS_DIR` (else torch's cache root) / `build_name()`."""
    from torch.utils import cpp_extension

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()) / build_name()


def clear_stale_lock(folder: Path, now: float | None = None) -> bool:
    """Remove a build lock older than `STALE_LOCK_S` (its build died); True if one was removed."""
    lock = folder / "lock"
    try:
        age = (time.time() if now is None else now) - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < STALE_LOCK_S:
        return False
    log.warning("removing %s: left %.0f minutes ago by a build that did not finish", lock, age / 60)
    lock.unlink(missing_ok=True)
    return True


@functools.cache
def load() -> bool:
    """Build (first time on this machine) and load the ops; False, with the reason logged, if they
    cannot be built here."""
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    try:
        folder = build_dir()
        folder.mkdir(parents=True, exist_ok=True)
        clear_stale_lock(folder)
        cpp_extension.load(
            name=folder.name,
            build_directory=str(folder),
            sources=[str(p) for p in SOURCES],
            extra_cflags=FLAGS,
            is_python_module=False,
            verbose=bool(os.environ.get("PREFIXCACHE_KERNEL_VERBOSE")),
        )
    except Exception as e:  # no compiler, no ninja, a build error: serve without the kernel
        log.warning("the CPU paged attention kernel could not be built (%s); attention falls back to SDPA", e)
        return False
    return all(hasattr(torch.ops.prefixcache, op) for op in OPS)
