"""`prefixcache simulate`: arguments in, a table (or one JSON object keyed by policy name) out."""

from __future__ import annotations

import json
from dataclasses import replace

from cluster.simulate.report import table
from cluster.simulate.sim import POLICY_NAMES, simulate
from cluster.simulate.timing import TimeModel
from cluster.simulate.trace import open_trace

_MS_FLAGS = {
    "prefill_ms_per_token": "prefill_s_per_token",
    "decode_ms_per_token": "decode_s_per_token",
    "transfer_ms_per_block": "transfer_s_per_block",
    "transfer_overhead_ms": "transfer_overhead_s",
}


def time_model(args) -> TimeModel:
    """TimeModel defaults, with any --*-ms flag given on the command line."""
    given = {field: getattr(args, flag) / 1e3 for flag, field in _MS_FLAGS.items() if getattr(args, flag) is not None}
    return replace(TimeModel(), **given)


def policies(name: str) -> list[str]:
    if name == "all":
        return list(POLICY_NAMES)
    if name not in POLICY_NAMES:
        raise ValueError(f"unknown --policy {name!r}; choose one of {', '.join(POLICY_NAMES)} or 'all'")
    return [name]


def run(args) -> int:
    results = simulate(
        open_trace(args.trace, limit=args.limit),
        workers=args.workers,
        capacity_blocks=args.capacity_blocks,
        policies=policies(args.policy),
        time=time_model(args),
        eviction=args.eviction,
        duplicates_first=not args.no_duplicates_first,
        routers=args.routers,
        affinity=args.router_affinity,
    )
    if args.json:
        print(json.dumps({k: r.to_dict() for k, r in results.items()}, indent=2))
    else:
        print(f"{args.workers} workers x {args.capacity_blocks} blocks, trace {args.trace}")
        print(table(results))
    return 0
