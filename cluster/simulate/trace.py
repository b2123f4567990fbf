"""Request traces in the Mooncake format, turned into the block-hash chains the router and the tree use.

One JSON object per line: `timestamp` (ms from the start), `input_length`,
`output_length`, `hash_ids` (the prompt's blocks of `TRACE_BLOCK_TOKENS`
tokens as remapped ids; two requests share a prefix exactly when their lists
share a leading run). A trace id names one block's *content*, so the real
chained `block_hash` over the ids, one id per block, gives exactly the
prefix identity the service uses: equal chains iff equal leading runs.

Only full blocks are cacheable (as in the engine): a partial last block is
prompt work that never hits.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from cache_store import BlockHash, block_hash, root_hash

TRACE_BLOCK_TOKENS = 512
TRACE_NAMESPACE = "mooncake-trace"  # the "model fingerprint" every simulated request shares


class TraceRequest(NamedTuple):
    arrival_s: float
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...]

    @property
    def full_blocks(self) -> int:
        """Blocks the cache can hold: complete ones only."""
        return min(len(self.hash_ids), self.input_tokens // TRACE_BLOCK_TOKENS)


class TraceError(ValueError):
    """A trace line is not in the Mooncake format; names the line."""


def open_trace(spec: str | Path, limit: int | None = None) -> list[TraceRequest]:
    """The trace `spec` names: a Mooncake-format file, or `conv:SEED:REQUESTS`, a conversation trace
    generated in code (`cluster.simulate.conversations`)."""
    from cluster.simulate.conversations import generate, parse_spec  # it builds on this module

    parsed = parse_spec(str(spec))
    if parsed is None:
        return load_trace(spec, limit)
    seed, requests = parsed
    return generate(seed, requests if limit is None else min(limit, requests))


def load_trace(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    """Requests in arrival order (a stable sort: equal timestamps keep file order)."""
    out: list[TraceRequest] = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            out.append(_parse(line, n))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise TraceError(f"{path}: no requests")
    return sorted(out, key=lambda r: r.arrival_s)


def _parse(line: str, n: int) -> TraceRequest:
    try:
        d = json.loads(line)
        req = TraceRequest(
            float(d["timestamp"]) / 1000.0,
            int(d["input_length"]),
            int(d["output_length"]),
            tuple(int(h) for h in d["hash_ids"]),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise TraceError(f"line {n}: {e!r}; expected {{timestamp, input_length, output_length, hash_ids}}") from None
    if req.input_tokens < 1 or req.output_tokens < 0:
        raise TraceError(f"line {n}: input_length must be >= 1 and output_length >= 0")
    return req


def chain_of(req: TraceRequest, root: BlockHash | None = None) -> list[BlockHash]:
    """The chained hashes of the request's full blocks: h_i = H(h_{i-1} || id_i)."""
    parent = root if root is not None else root_hash(TRACE_NAMESPACE, None)
    chain: list[BlockHash] = []
    for hid in req.hash_ids[: req.full_blocks]:
        parent = block_hash(parent, (hid,))
        chain.append(parent)
    return chain


def block_tokens(req: TraceRequest) -> Sequence[tuple[int]]:
    """What the tree stores as a block's "tokens" (and verifies on a hit): its trace id."""
    return [(hid,) for hid in req.hash_ids[: req.full_blocks]]
