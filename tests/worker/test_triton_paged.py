"""The Triton paged attention kernel (the CUDA backend) checked against SDPA: on CPU under Triton's
interpreter in a process of its own (the interpreter must be chosen before triton is first
imported, and the engine's imports load it); on a GPU machine, compiled on the device."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
CASES = Path(__file__).with_name("triton_cases.py")
ROOT = Path(__file__).parents[2]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_triton_kernel_matches_sdpa(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    env = {**os.environ, "PREFIXCACHE_TRITON_DEVICE": device}
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(CASES)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
