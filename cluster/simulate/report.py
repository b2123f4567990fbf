"""Human-readable table of a simulation's results (the CLI's default output)."""

from __future__ import annotations

from collections.abc import Mapping

from cluster.simulate.metrics import LOSSES, PolicyResult
from cluster.simulate.sim import BOUND

HEADER = (
    "| policy | hit rate | vs one shared cache | TTFT p50 | TTFT p99 | load max/mean | peer fetches "
    "| stored blocks | distinct | duplicates (mean) | lost vs shared: held elsewhere / evicted / in flight "
    "| placed off holder (blocks) |"
)


def table(results: Mapping[str, PolicyResult]) -> str:
    rows = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    for r in results.values():
        vs = f"{r.vs_shared:.1%}" if r.vs_shared is not None else "-"
        rows.append(
            f"| {r.policy} | {r.hit_rate:.1%} | {vs} | {r.ttft_p50_s * 1e3:.0f} ms | {r.ttft_p99_s * 1e3:.0f} ms "
            f"| {r.load_imbalance:.2f} | {r.peer_fetches} | {r.stored_blocks:,} | {r.distinct_blocks:,} "
            f"| {r.duplicate_blocks_mean:,.0f} | {_lost(r)} | {r.placed_off_holder} ({r.off_holder_blocks:,}) |"
        )
    return "\n".join(rows)


def _lost(r: PolicyResult) -> str:
    """Hit rate points lost against one shared cache, by reason (share of all prompt tokens)."""
    if r.policy == BOUND or not r.prompt_tokens:
        return "-"
    return " / ".join(f"{r.lost_vs_shared.get(k, 0) / r.prompt_tokens:.1%}" for k in LOSSES)
