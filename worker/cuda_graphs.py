"""CUDA graphs of the decode step at bucketed batch sizes: a pure decode step is one graph replay.

A decode step of a ~1B model on a GPU reads ~2 GB in about a millisecond, while eager PyTorch
issues ~40 kernels per decoder layer, each with Python around its launch: the step is bound by
launches, not by memory, at any batch size. vLLM and SGLang capture the decode step once per
batch-size bucket and replay it; so does this module:

  - The step's inputs sit in static device buffers: token ids, positions, KV write slots, context
    lengths, query lengths (`_inputs`) and each row's block table at the full table width (the
    Triton kernel stops at each request's context length, so one graph serves every context).
  - n running decodes replay the smallest captured size b >= n. The b - n padding rows have query
    length 0 (the kernel returns at once) and write their K/V into one scratch block that the
    engine holds for this alone (never in a block table, never cached).
  - The captured code is `ModuleForward`: the model's own modules (embedding, rotary, decoder
    layers, final norm, lm_head), without the model-level plumbing a paged step does not use and
    that does not capture (mask construction, cache objects). Its arithmetic is the model's own
    forward's: bit-identical on CPU (tests/worker/test_cuda_graphs.py).
  - Every other step (prefill chunks, mixed steps, more decodes than the largest size) runs eager.

Padding rows change the GEMMs' row count, which on a GPU can move a row's bits (~1e-3 in
bfloat16) as any change of batch does there; invariant 1 on a GPU is greedy tokens equal and
float32 logits within tolerance, which the CUDA tests check with graphs on and off.
"""

from __future__ import annotations

import bisect
import logging

import torch

from worker.lean import FAMILIES
from worker.paged_attention import StepAttention, StepMeta, active_step

log = logging.getLogger(__name__)

# Rows of `DecodeGraphs._inputs` (int64, one column per batch row).
IDS, POSITIONS, SLOTS, CONTEXT, QUERY, TABLE_ROW = range(6)


def capture_sizes(max_running: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then every multiple of 16, up to and including max_running (vLLM's sizes, capped)."""
    sizes = {b for b in (1, 2, 4, 8) if b < max_running} | set(range(16, max_running, 16)) | {max_running}
    return tuple(sorted(sizes))


class ModuleForward:
    """`__call__(ids [T], positions [T], step, rows [n])` -> logits [n, vocab], calling the model's
    own modules layer by layer (a Llama-family model: worker.lean.FAMILIES)."""

    def __init__(self, model):
        inner = model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.layers = list(inner.layers[: model.config.num_hidden_layers])
        self.norm = inner.norm
        self.lm_head = model.lm_head

    @classmethod
    def build(cls, model) -> ModuleForward | None:
        """None where `model` is not one whose forward is exactly this loop."""
        lm_class, _ = FAMILIES.get(getattr(model.config, "model_type", None), (None, None))
        inner = getattr(model, "model", None)
        if type(model).__name__ != lm_class or inner is None:
            return None
        if not all(hasattr(inner, name) for name in ("embed_tokens", "rotary_emb", "layers", "norm")):
            return None
        return cls(model)

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, step: StepAttention, rows: torch.Tensor):
        pos = positions.unsqueeze(0)
        with active_step(step):
            x = self.embed(ids.unsqueeze(0))
            rotary = self.rotary(x, pos)
            for layer in self.layers:
                out = layer(x, attention_mask=None, position_ids=pos, position_embeddings=rotary)
                x = out[0] if isinstance(out, tuple) else out
            x = self.norm(x)
        return self.lm_head(x[0].index_select(0, rows))


class DecodeGraphs:
    """Captured decode steps, one per size of `sizes`, sharing one memory pool.

    `tables` is the runner's block-table array ([rows, max_blocks] int32, device); `scratch_block`
    a pool block nobody else reads or writes. `run` returns a copy of the graph's output buffer
    (a request may keep its logits past the next replay). Before `capture` (or without CUDA) `run`
    runs the same code eagerly, padding rows included: the CPU tests check the inputs, padding and
    tables that way, with `backend` "cpu_kernel"."""

    def __init__(self, forward, pool: torch.Tensor, tables: torch.Tensor, scratch_block: int, sizes, backend="triton"):
        self.forward = forward
        self.backend = backend
        self.pool = pool
        self.tables = tables
        self.sizes = tuple(sorted(sizes))
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * pool.shape[4]
        width = self.sizes[-1]
        dev = pool.device
        self._inputs = torch.zeros((6, width), dtype=torch.long, device=dev)
        self._q_starts = torch.arange(width, dtype=torch.int32, device=dev)  # one query row per request
        self._rows = torch.arange(width, dtype=torch.long, device=dev)
        self._tables = torch.full((width, tables.shape[1]), scratch_block, dtype=torch.int32, device=dev)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self.steps = 0  # decode steps run here (replayed, or eagerly before capture)

    @property
    def largest(self) -> int:
        return self.sizes[-1]

    def capture(self) -> None:
        """Warm every size eagerly on a side stream (Triton compiles, cuBLAS picks its kernels), then
        capture them, largest first so the smaller ones reuse its memory."""
        self._idle()
        side = torch.cuda.Stream(self.pool.device)
        side.wait_stream(torch.cuda.current_stream(self.pool.device))
        with torch.cuda.stream(side):
            for b in self.sizes:
                self._step(b)
        torch.cuda.current_stream(self.pool.device).wait_stream(side)
        torch.cuda.synchronize(self.pool.device)
        mempool = torch.cuda.graph_pool_handle()
        for b in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=mempool, capture_error_mode="thread_local"):
                self._logits[b] = self._step(b)
            self._graphs[b] = graph
        torch.cuda.synchronize(self.pool.device)

    def run(self, ids: list[int], positions: list[int], slots: list[int], contexts: list[int], table_rows: list[int]):
        """Logits [n, vocab] of n decodes (one new token each), n <= `largest`."""
        n = len(ids)
        b = self.sizes[bisect.bisect_left(self.sizes, n)]
        pad = b - n
        host = torch.tensor(
            [
                ids + [0] * pad,
                positions + [0] * pad,
                slots + [self.scratch_slot] * pad,
                contexts + [1] * pad,
                [1] * n + [0] * pad,  # padding rows attend nothing
                table_rows + [0] * pad,
            ],
            dtype=torch.long,
        )
        self._inputs[:, :b].copy_(host)
        torch.index_select(self.tables, 0, self._inputs[TABLE_ROW, :n], out=self._tables[:n])
        self.steps += 1
        if b in self._graphs:
            self._graphs[b].replay()
            return self._logits[b][:n].clone()
        return self._step(b)[:n]

    def _idle(self) -> None:
        """Inputs that touch only the scratch block: what warm-up and capture run on."""
        self._inputs.zero_()
        self._inputs[SLOTS].fill_(self.scratch_slot)
        self._inputs[CONTEXT].fill_(1)
        self._inputs[QUERY].fill_(1)
        self._tables.fill_(self.scratch_block)

    def _step(self, b: int) -> torch.Tensor:
        ins = self._inputs[:, :b]
        meta = StepMeta(
            write_slots=ins[SLOTS],
            tables=self._tables[:b],
            ctx_lens=ins[CONTEXT].to(torch.int32),
            q_starts=self._q_starts[:b],
            q_lens=ins[QUERY].to(torch.int32),
            spans=tuple((i, 1, 1) for i in range(b)),  # the host's view: one query row each
        )
        return self.forward(ins[IDS], ins[POSITIONS], StepAttention(self.pool, meta, self.backend), self._rows[:b])


def decode_graphs(model, store, tables: torch.Tensor, attention: str, max_running: int):
    """(DecodeGraphs or None, what `Engine.info()["cuda_graphs"]` says). The scratch block is a
    working block of `store` (the TieredStore) held for the engine's life; a capture that fails
    gives it back and leaves the engine eager, with the reason reported."""
    pool = store.device_pool.data
    if pool.device.type != "cuda":
        return None, "off: not a CUDA device"
    if attention != "triton":
        return None, f"off: attention {attention!r} (graphs need 'triton')"
    forward = ModuleForward.build(model)
    if forward is None:
        return None, f"off: {type(model).__name__} is not a {'/'.join(FAMILIES)} model"
    taken = store.alloc_working(1)
    if not taken:
        return None, "off: no free pool block for the padding rows"
    graphs = DecodeGraphs(forward, pool, tables, taken[0], capture_sizes(max_running))
    try:
        graphs.capture()
    except Exception as e:  # any capture failure leaves a working eager engine
        log.exception("CUDA graph capture failed; decode steps run eager")
        torch.cuda.synchronize(pool.device)
        store.free_working(taken)
        return None, f"off: capture failed: {type(e).__name__}: {e}"
    return graphs, f"decode steps, {len(graphs.sizes)} sizes up to {graphs.largest}"
