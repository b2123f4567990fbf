"""The engine's batching settings: one frozen, checked object with per-device defaults."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from cache_store import ConfigError

if TYPE_CHECKING:
    import torch

# How a step attends (see worker.paged_attention). Defined here, not there, so reading the settings
# (the CLI does) imports no torch. "auto": the fastest built for the device.
AttentionBackend = Literal["cpu_kernel", "triton", "sdpa"]
AttentionMode = Literal["auto", "cpu_kernel", "triton", "sdpa"]
ATTENTION_MODES: tuple[AttentionMode, ...] = ("auto", "cpu_kernel", "triton", "sdpa")
# How the linear layers' weights are laid out (see worker.linear, which reads these names).
LinearMode = Literal["auto", "kernel", "packed", "plain"]
LINEAR_MODES: tuple[LinearMode, ...] = ("auto", "kernel", "packed", "plain")
# Which code runs the model's forward in a step (see worker.lean). "auto": the lean one where it applies.
ForwardMode = Literal["auto", "lean", "transformers"]
FORWARD_MODES: tuple[ForwardMode, ...] = ("auto", "lean", "transformers")
# Whether pure decode steps replay CUDA graphs (see worker.cuda_graphs). "auto": on CUDA where they apply.
CudaGraphsMode = Literal["auto", "off"]
CUDA_GRAPHS_MODES: tuple[CudaGraphsMode, ...] = ("auto", "off")

# (max_running, max_batch_tokens) when not given. CPU: a step of 256 tokens keeps decode latency
# near 0.1 s on 2 cores with the demo model while 32 requests share each forward; GPU: the usual
# serving-engine sizes (a chunk of 2k prefill tokens beside 256 decodes).
DEVICE_DEFAULTS = {"cpu": (32, 256), "cuda": (256, 2048)}


@dataclass(frozen=True)
class EngineConfig:
    """max_running: requests in one batch (1 = one at a time, batch-independent bits).
    max_batch_tokens: tokens per forward (decodes + prefill chunks); bounds a step's time.
    attention: how each step attends (see worker.paged_attention).
    linear: the linear layers' weight layout (see worker.linear; "kernel" and "packed" cost a second copy).
    forward: the lean Llama forward or the model's own (see worker.lean).
    cuda_graphs: replay decode steps as CUDA graphs where they apply (see worker.cuda_graphs)."""

    max_running: int | None = None
    max_batch_tokens: int | None = None
    attention: AttentionMode = "auto"
    linear: LinearMode = "auto"
    forward: ForwardMode = "auto"
    cuda_graphs: CudaGraphsMode = "auto"

    def resolved(self, device: torch.device) -> EngineConfig:
        running, tokens = DEVICE_DEFAULTS.get(device.type, DEVICE_DEFAULTS["cpu"])
        out = replace(
            self,
            max_running=self.max_running if self.max_running is not None else running,
            max_batch_tokens=self.max_batch_tokens if self.max_batch_tokens is not None else tokens,
        )
        out.check()
        return out

    def check(self) -> None:
        for name in ("max_running", "max_batch_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_running and self.max_batch_tokens and self.max_batch_tokens < self.max_running:
            raise ConfigError(
                f"max_batch_tokens ({self.max_batch_tokens}) must be >= max_running ({self.max_running}): "
                "every running request feeds at least one token per step"
            )
        if self.attention not in ATTENTION_MODES:
            raise ConfigError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.linear not in LINEAR_MODES:
            raise ConfigError(f"linear must be one of {LINEAR_MODES}, got {self.linear!r}")
        if self.forward not in FORWARD_MODES:
            raise ConfigError(f"forward must be one of {FORWARD_MODES}, got {self.forward!r}")
        if self.cuda_graphs not in CUDA_GRAPHS_MODES:
            raise ConfigError(f"cuda_graphs must be one of {CUDA_GRAPHS_MODES}, got {self.cuda_graphs!r}")
