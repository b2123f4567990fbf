"""One forward over a ragged batch: flatten the scheduled tokens, attend through the pool, return logits.

Input is `[1, T]` (every request's new tokens side by side) with per-token
position ids; `worker.paged_attention` does the attention. Only the rows
whose chunk reaches the request's newest token are projected to logits
(`logits_to_keep` given as indices), one row per such request. On CUDA a
step of decodes alone replays a captured graph instead (`graphs`, which the
engine sets: `worker.cuda_graphs`).

Host work per step is proportional to the new tokens, not the contexts:
block tables live in one device array (`tables`, a row per request that may
run), and a step writes there only the entries added since the last step;
the step's tables are one gather of the batch's rows.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch

from worker.config import AttentionBackend
from worker.cuda_graphs import DecodeGraphs
from worker.lean import LeanLlama
from worker.paged_attention import StepAttention, StepMeta, active_step
from worker.sequence import Sequence


class _HostStep(NamedTuple):
    ids: list[int]  # [T] new tokens of every request, side by side
    positions: list[int]  # [T]
    slots: list[int]  # [T] block * block_size + offset where each new token's KV goes
    ints: list[list[int]]  # [4][B]: row in `tables`, context after the step, first query row, query rows
    keep: list[int]  # rows whose logits are sampled
    sampled: list[Sequence]  # the requests those rows belong to


class ModelRunner:
    def __init__(
        self,
        model,
        pool: torch.Tensor,
        block_size: int,
        device: torch.device,
        backend: AttentionBackend,
        *,
        rows: int,
        max_blocks: int,
        lean: LeanLlama | None = None,
    ):
        self.model = model
        self.pool = pool
        self.block_size = block_size
        self.device = device
        self.backend = backend
        self.tables = torch.zeros((rows, max_blocks), dtype=torch.int32, device=device)
        self._keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.lean = lean  # worker.lean's forward, where it applies; else the model's own
        self.graphs: DecodeGraphs | None = None  # decode steps as CUDA graphs, where the engine captured them

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, list[Sequence]]:
        """Logits [n, vocab] for the n requests of `batch` that get a new token, and those requests."""
        host = self._prepare(batch)
        if self.graphs is not None and self._graphable(host):
            ints = host.ints
            return self.graphs.run(host.ids, host.positions, host.slots, ints[1], ints[0]), host.sampled
        inp = torch.tensor([host.ids], dtype=torch.long).to(self.device)
        pos = torch.tensor([host.positions], dtype=torch.long).to(self.device)
        step = StepAttention(self.pool, self._step_meta(host), self.backend)
        rows = torch.tensor(host.keep or [len(host.ids) - 1], dtype=torch.long).to(self.device)
        sampled = host.sampled
        if self.lean is not None:
            return self.lean(inp[0], pos[0], step, rows)[: len(sampled)], sampled
        kw = {"logits_to_keep": rows} if self._keep_arg else {}
        with active_step(step):
            logits = self.model(input_ids=inp, position_ids=pos, use_cache=False, **kw).logits[0]
        if not self._keep_arg:
            logits = logits[rows]
        return logits[: len(sampled)], sampled

    def _graphable(self, host: _HostStep) -> bool:
        """Every request decodes one token (and samples it), and the captured sizes hold them all."""
        n = len(host.ids)
        return n == len(host.ints[0]) == len(host.keep) and n <= self.graphs.largest

    def _prepare(self, batch: list[tuple[Sequence, int]]) -> _HostStep:
        """Host lists of one step (O(new tokens)); syncs new table entries to the device array."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        ints: list[list[int]] = [[], [], [], []]  # row, ctx, q_start, q_len per request
        new_at: tuple[list[int], list[int], list[int]] = ([], [], [])  # (row, column, slot) to write
        keep: list[int] = []
        sampled: list[Sequence] = []
        for seq, n in batch:
            table = seq.blocks
            start = seq.kv_len
            q_start = len(ids)
            ids += seq.token_range(start, start + n)
            positions += range(start, start + n)
            slots += [table.entries[t // bs].slot * bs + t % bs for t in range(start, start + n)]
            for col in range(table.synced, len(table.entries)):
                new_at[0].append(table.row)
                new_at[1].append(col)
                new_at[2].append(table.entries[col].slot)
            table.synced = len(table.entries)
            for column, value in zip(ints, (table.row, start + n, q_start, n)):
                column.append(value)
            if start + n == seq.num_tokens:
                keep.append(len(ids) - 1)
                sampled.append(seq)
        if new_at[0]:
            r, c, s = (torch.tensor(x, dtype=torch.long) for x in new_at)
            self.tables[r.to(self.device), c.to(self.device)] = s.to(self.device, torch.int32)
        return _HostStep(ids, positions, slots, ints, keep, sampled)

    def _step_meta(self, host: _HostStep) -> StepMeta:
        ints = host.ints
        packed = torch.tensor(ints, dtype=torch.int32).to(self.device)  # [4, B]
        max_ctx = max(ints[1])
        width = -(-max_ctx // self.block_size)
        tables = self.tables[:, :width].index_select(0, packed[0].long())
        return StepMeta(
            write_slots=torch.tensor(host.slots, dtype=torch.long).to(self.device),
            tables=tables,
            ctx_lens=packed[1],
            q_starts=packed[2],
            q_lens=packed[3],
            spans=tuple(zip(ints[2], ints[3], ints[1])),
        )
