"""Trace-driven cluster simulator: the real router, placement policies, prefix tree and eviction,
with simulated workers on a simulated clock (no model runs), at 8-256 workers on 2 cores.

    from cluster.simulate import load_trace, simulate
    results = simulate(load_trace(path), workers=64, capacity_blocks=1500, policies=["cache_aware"])
    results["cache_aware"].hit_rate, results["one_shared_cache"].hit_rate

`one_shared_cache` is the bound: one cache of the whole cluster's capacity that sees every
request in arrival order and serves it at once.
"""

from cluster.simulate.metrics import PolicyResult
from cluster.simulate.sim import BOUND, POLICY_NAMES, simulate
from cluster.simulate.timing import TimeModel
from cluster.simulate.trace import TraceError, TraceRequest, load_trace, open_trace

__all__ = [
    "BOUND",
    "POLICY_NAMES",
    "PolicyResult",
    "TimeModel",
    "TraceError",
    "TraceRequest",
    "load_trace",
    "open_trace",
    "simulate",
]
