"""An in-process stand-in for `MetadataIndex` with the same answers, so a simulation of 256 workers
and thousands of requests runs in seconds instead of paying a Redis round trip per call.

It implements exactly the calls the real code makes on the index in a simulation:
`TieredStore` publishes its moves (`publish`, `replace_blocks`), `Router.place` asks `holders`,
and cluster-aware eviction reads `holder_counts`. Semantics follow `cache_store.index`: a
worker's holding of a chain is its leading run of blocks, sorted most first. Leases and
generations are not simulated (every simulated worker stays alive).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from cache_store import BlockHash, Holding


class SimIndex:
    def __init__(self) -> None:
        self._blocks: dict[BlockHash, dict[str, str]] = {}  # hash -> {worker: tier}
        self.stored = 0  # block copies held cluster-wide
        self.holders_calls = 0
        self.ever: set[BlockHash] = set()  # every block some worker has held (loss accounting)

    # ---- what TieredStore writes -------------------------------------------------

    def publish(self, worker_id: str, generation: int, events: Sequence[tuple[str, BlockHash, str]]) -> None:
        for op, h, tier in events:
            entry = self._blocks.setdefault(h, {})
            if op == "remove":
                if entry.pop(worker_id, None) is not None:
                    self.stored -= 1
                if not entry:
                    del self._blocks[h]
            else:
                self.ever.add(h)
                if worker_id not in entry:
                    self.stored += 1
                entry[worker_id] = tier

    def replace_blocks(self, worker_id: str, generation: int, blocks: Iterable[tuple[BlockHash, str]]) -> None:
        for h in [h for h, e in self._blocks.items() if worker_id in e]:
            self.publish(worker_id, generation, [("remove", h, "")])
        self.publish(worker_id, generation, [("add", h, t) for h, t in blocks])

    # ---- what the router and eviction read -----------------------------------------

    def holders(self, chain: Sequence[BlockHash]) -> list[Holding]:
        """Every worker's leading run of `chain`, most blocks first (as MetadataIndex.holders)."""
        self.holders_calls += 1
        run: dict[str, int] = {}
        dev: dict[str, int] = {}
        live: set[str] | None = None
        for i, h in enumerate(chain):
            entry = self._blocks.get(h)
            if not entry:
                break
            now = set(entry) if live is None else live.intersection(entry)
            if not now:
                break
            for w in now:
                run[w] = i + 1
                dev[w] = dev.get(w, 0) + (entry[w] == "device")
            live = now
        out = [Holding(w, n, dev[w], 1) for w, n in run.items()]
        return sorted(out, key=lambda x: (-x.blocks, -x.device_blocks, x.worker_id))

    def longest_run(self, chain: Sequence[BlockHash]) -> int:
        """The most leading blocks of `chain` any one worker holds (for the simulator's own
        accounting: not a `holders` call, so `holders_calls` keeps counting the router's only)."""
        live: set[str] | None = None
        for i, h in enumerate(chain):
            entry = self._blocks.get(h)
            live = set(entry or ()) if live is None else live.intersection(entry or ())
            if not live:
                return i
        return len(chain)

    def holder_counts(self, hashes: Iterable[BlockHash]) -> dict[BlockHash, int]:
        """How many workers hold each block (one batched read; absent blocks count 0)."""
        return {h: len(self._blocks.get(h, ())) for h in hashes}

    @property
    def distinct(self) -> int:
        """Blocks held by at least one worker."""
        return len(self._blocks)
