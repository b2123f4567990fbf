"""When is pulling KV from a peer cheaper than recomputing it?

Both sides are measured on the running worker, not assumed: prefill seconds
per token at start-up (a timed forward pass), and transfer seconds per block
plus a fixed per-fetch overhead by the actor layer (a timed round trip
through Ray's object store). Fetching n blocks pays when

    overhead + n * transfer_per_block  <  n * block_size * prefill_per_token

so the crossover is overhead / (block_size * prefill_per_token - transfer_per_block)
blocks; below it, recompute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class CostModel:
    prefill_s_per_token: float
    transfer_s_per_block: float = math.inf  # unknown until measured: never fetch
    transfer_overhead_s: float = 0.0

    def with_transfer(self, per_block_s: float, overhead_s: float) -> CostModel:
        return replace(self, transfer_s_per_block=per_block_s, transfer_overhead_s=overhead_s)

    def recompute_s(self, n_blocks: int, block_size: int) -> float:
        return n_blocks * block_size * self.prefill_s_per_token

    def fetch_s(self, n_blocks: int) -> float:
        return self.transfer_overhead_s + n_blocks * self.transfer_s_per_block

    def fetch_pays(self, n_blocks: int, block_size: int) -> bool:
        return n_blocks > 0 and self.fetch_s(n_blocks) < self.recompute_s(n_blocks, block_size)

    def crossover_blocks(self, block_size: int) -> float:
        """Smallest number of blocks for which fetching beats recomputing (inf: never)."""
        gain = block_size * self.prefill_s_per_token - self.transfer_s_per_block
        return self.transfer_overhead_s / gain if gain > 0 else math.inf

    def to_dict(self, block_size: int) -> dict[str, float]:
        return {
            "prefill_ms_per_token": self.prefill_s_per_token * 1e3,
            "transfer_ms_per_block": self.transfer_s_per_block * 1e3,
            "transfer_overhead_ms": self.transfer_overhead_s * 1e3,
            "crossover_blocks": self.crossover_blocks(block_size),
        }
