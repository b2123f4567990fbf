"""A simulated worker: the REAL `TieredStore` (prefix tree, eviction policy, index publishing) over
KV pools of 2 bytes per block, driven the way the engine drives it. No model runs.

One trace block (512 tokens) is one store block whose single "token" is the trace's block id, so
the tree's token check, the chained hashes, pinning, eviction order and the index's view are all
the production code's. Only the device tier is simulated (host bytes 0), so `capacity_blocks` is
the whole cache of the worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from cache_store import BlockHash, CacheConfig, Hold, KVShape, TieredStore

SHAPE = KVShape(layers=1, kv_heads=1, block_size=1, head_dim=1, dtype=torch.uint8)


class Start(NamedTuple):
    hold: Hold  # pinned cached prefix (local + fetched) until the prefill ends
    local_blocks: int
    fetched_blocks: int


class SimWorker:
    def __init__(
        self, worker_id: str, capacity_blocks: int, eviction: str, index, *, duplicates_first: bool = True
    ) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be >= 1, got {capacity_blocks}")
        config = CacheConfig(
            block_size=1,
            device_bytes=capacity_blocks * SHAPE.block_bytes,
            host_bytes=0,
            eviction=eviction,
            duplicates_first=duplicates_first,
        )
        self.worker_id = worker_id
        self.store = TieredStore(config, SHAPE, "cpu")
        self.store.bind_index(index, worker_id)
        self.store.set_generation(1)
        self.store.resync()
        self._zeros = torch.zeros((0, *SHAPE.block_dims), dtype=SHAPE.dtype)
        self._refreshed_at = float("-inf")

    def refresh_copies(self, now: float, every_s: float) -> None:
        """The worker's periodic batched read of holder counts (as with its heartbeat), at most every `every_s`."""
        if now - self._refreshed_at >= every_s:
            self.store.refresh_copies()
            self._refreshed_at = now

    def _kv(self, n: int) -> torch.Tensor:
        if self._zeros.shape[0] < n:
            self._zeros = torch.zeros((max(n, 2 * self._zeros.shape[0]), *SHAPE.block_dims), dtype=SHAPE.dtype)
        return self._zeros[:n]

    def start(
        self, chain: Sequence[BlockHash], tokens: Sequence[tuple[int]], peer: SimWorker | None, peer_blocks: int
    ) -> Start:
        """The engine's `_prefill` start: pin the local prefix, then pull a longer one from `peer`."""
        hold = self.store.acquire(chain, tokens)
        local = len(hold)
        if peer is None or peer_blocks <= local:
            return Start(hold, local, 0)
        got = peer.store.export(chain[local:peer_blocks])
        n = len(got.hashes)
        if n == 0:
            return Start(hold, local, 0)
        parent = chain[local - 1] if local else None
        self.store.insert(parent, got.hashes, got.tokens, got.kv)
        longer = self.store.acquire(chain, tokens)
        self.store.release(hold)
        return Start(longer, local, max(0, len(longer) - local))

    def finish_prefill(self, start: Start, chain: Sequence[BlockHash], tokens: Sequence[tuple[int]]) -> None:
        """The engine's write-back: cache the computed blocks below the held prefix, then unpin."""
        have = len(start.hold)
        if have < len(chain):
            parent = chain[have - 1] if have else None
            self.store.insert(parent, chain[have:], tokens[have:], self._kv(len(chain) - have))
        self.store.release(start.hold)

    @property
    def blocks(self) -> int:
        return self.store.stats().device.blocks
