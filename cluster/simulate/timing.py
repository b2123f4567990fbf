"""The time model of a simulated worker: per-token costs, no model runs.

A worker is a FIFO server: a request waits for the requests placed before it, then prefills its
uncached tokens (after fetching blocks from a peer, if the router said so), then decodes. TTFT is
wait + fetch + prefill + one decode step; the worker is busy for the whole request (decode cost
is per token amortized over a continuous batch, so it is small).

The defaults are assumptions for an H100-class worker serving a 7-8B model, not measurements on
this machine (which has no GPU): prefill 10k tokens/s, 1 ms of worker time per generated token
(a decode step of ~30 ms shared by a batch of ~30), and a KV block of 512 tokens (64 MiB with
GQA in fp16) fetched over a 25 GB/s link in ~3 ms plus a fixed 2 ms per fetch. They are flags of
`prefixcache simulate`, so measured numbers of a real deployment can replace them.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.policies import WorkerCosts


@dataclass(frozen=True)
class TimeModel:
    prefill_s_per_token: float = 1e-4
    decode_s_per_token: float = 1e-3
    transfer_s_per_block: float = 3e-3
    transfer_overhead_s: float = 2e-3

    def prefill_s(self, tokens: int) -> float:
        return tokens * self.prefill_s_per_token

    def fetch_s(self, blocks: int) -> float:
        return self.transfer_overhead_s + blocks * self.transfer_s_per_block if blocks else 0.0

    def fetch_pays(self, blocks: int, block_tokens: int) -> bool:
        """The engine's rule (worker.costs.CostModel.fetch_pays): fetch only when cheaper than recompute."""
        return blocks > 0 and self.fetch_s(blocks) < self.prefill_s(blocks * block_tokens)

    def worker_costs(self) -> WorkerCosts:
        """What the router is told about every worker (the actor reports its measured costs the same way)."""
        return WorkerCosts(
            prefill_s_per_token=self.prefill_s_per_token,
            transfer_s_per_block=self.transfer_s_per_block,
            transfer_overhead_s=self.transfer_overhead_s,
            max_running=1,  # a simulated worker serves one request at a time (FIFO)
        )


INSTANT = TimeModel(0.0, 0.0, 0.0, 0.0)  # the one-shared-cache bound: every request served on arrival
