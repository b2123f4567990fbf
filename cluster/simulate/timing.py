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

from worker.costs import CostModel


@dataclass(frozen=True)
class TimeModel(CostModel):
    """A simulated worker's costs: the router scores it with them as it scores a real worker with the
    engine's measured ones, plus the decode time the simulator charges. `max_running` stays 1: a
    simulated worker serves one request at a time (FIFO)."""

    prefill_s_per_token: float = 1e-4
    transfer_s_per_block: float = 3e-3
    transfer_overhead_s: float = 2e-3
    decode_s_per_token: float = 1e-3


# the one-shared-cache bound: every request served on arrival
INSTANT = TimeModel(prefill_s_per_token=0.0, transfer_s_per_block=0.0, transfer_overhead_s=0.0, decode_s_per_token=0.0)
