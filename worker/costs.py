"""What a worker's time costs: the one cost model, in seconds, that the engine decides peer fetches
with and the router scores placements with (the router imports this module, so no torch here).

The terms are measured on the running worker, not assumed: prefill seconds per token and host ->
device promotion seconds per block at start-up (a timed forward pass, a timed promotion through a
TieredStore; the prefill is re-timed at a few idle moments after, keeping the minimum), transfer seconds per block plus a fixed per-fetch overhead by the actor layer (a
timed round trip through Ray's object store). The defaults are what the router assumes of a worker
whose measurements have not reached it yet. Fetching n blocks pays when

    overhead + n * transfer_per_block  <  n * block_size * prefill_per_token

so the crossover is overhead / (block_size * prefill_per_token - transfer_per_block)
blocks; below it, recompute. A disk hit is weighed the same way: reading n blocks (a cold read,
timed at start-up through the disk tier's own read path, checksums included) plus promoting them
must beat prefilling their tokens, else the worker recomputes them and the router scores them as
uncached.

The router scores placements with `rounded()` terms (2 significant figures): a timed pass varies by
more than 1% from run to run, so workers on equal hardware measure costs that differ only in noise
digits; rounded, they share one profile, and placement scores one idle worker per profile instead
of every worker.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class CostModel:
    prefill_s_per_token: float = 4e-4
    promote_s_per_block: float = 2e-5
    transfer_s_per_block: float = math.inf  # unknown until measured: never fetch
    transfer_overhead_s: float = 0.0
    disk_read_s_per_block: float = math.inf  # no disk tier, or not measured yet: never read
    disk_read_overhead_s: float = 0.0  # per read call (a run of consecutive blocks)
    max_running: int = 1  # requests the worker's engine batches into one forward

    def rounded(self, digits: int = 2) -> CostModel:
        """The measured seconds to `digits` significant figures (inf and 0 stay): what the router
        scores with, so equal hardware is one cost profile (module docstring)."""
        return replace(self, **{name: _significant(getattr(self, name), digits) for name in _MEASURED})

    def with_transfer(self, per_block_s: float, overhead_s: float) -> CostModel:
        return replace(self, transfer_s_per_block=per_block_s, transfer_overhead_s=overhead_s)

    def prefill_s(self, tokens: int) -> float:
        return tokens * self.prefill_s_per_token

    def fetch_s(self, n_blocks: int) -> float:
        # no fetch costs nothing (and 0 * inf would be nan)
        return self.transfer_overhead_s + n_blocks * self.transfer_s_per_block if n_blocks else 0.0

    def fetch_pays(self, n_blocks: int, block_size: int) -> bool:
        return n_blocks > 0 and self.fetch_s(n_blocks) < self.prefill_s(n_blocks * block_size)

    def disk_read_s(self, n_blocks: int) -> float:
        """Reading n blocks from disk and promoting them to device (0 for none)."""
        if not n_blocks:
            return 0.0
        return self.disk_read_overhead_s + n_blocks * (self.disk_read_s_per_block + self.promote_s_per_block)

    def disk_read_pays(self, n_blocks: int, block_size: int) -> bool:
        return n_blocks > 0 and self.disk_read_s(n_blocks) < self.prefill_s(n_blocks * block_size)

    def crossover_blocks(self, block_size: int) -> float:
        """Smallest number of blocks for which fetching beats recomputing (inf: never)."""
        gain = block_size * self.prefill_s_per_token - self.transfer_s_per_block
        return self.transfer_overhead_s / gain if gain > 0 else math.inf

    def to_dict(self, block_size: int) -> dict[str, float]:
        """The terms plus the crossover they imply, for stats; `from_dict` reads it back."""
        return {
            **asdict(self),
            "crossover_blocks": self.crossover_blocks(block_size),
            "disk_crossover_blocks": self.disk_crossover_blocks(block_size),
        }

    def disk_crossover_blocks(self, block_size: int) -> float:
        """Smallest number of blocks for which a disk read beats recomputing (inf: never)."""
        gain = block_size * self.prefill_s_per_token - self.disk_read_s_per_block - self.promote_s_per_block
        return self.disk_read_overhead_s / gain if gain > 0 else math.inf

    @classmethod
    def from_dict(cls, d: dict) -> CostModel:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


_MEASURED = (
    "prefill_s_per_token",
    "promote_s_per_block",
    "transfer_s_per_block",
    "transfer_overhead_s",
    "disk_read_s_per_block",
    "disk_read_overhead_s",
)

# What the router assumes of a worker whose measurements have not reached it: one shared instance,
# so a placement at 1,000 workers does not build (and hash) a CostModel per worker.
DEFAULT_COSTS = CostModel()


def _significant(value: float, digits: int) -> float:
    return float(f"{value:.{digits - 1}e}")  # correctly rounded; "inf" and "0.0e+00" read back as such
