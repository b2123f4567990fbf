"""Pulling a prefix's KV from a peer worker into this worker's cache, before the request is admitted.

The router says which peer holds how many leading blocks. The pull happens
only when the measured cost model says fetching beats recomputing; every
block's hash and token ids are checked against the request's own, and the
shape and dtype against this model's. Whatever fails is recomputed, never
used (and never counted as a hit).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from cache_store import Counters, Exported, Hold, TieredStore
from cache_store.counter_names import (
    PEER_FETCH_FAILURES,
    PEER_FETCH_MISMATCHES,
    PEER_FETCH_SKIPPED,
    PEER_FETCHED_BLOCKS,
    PEER_FETCHES,
)
from cache_store.hashing import BlockHash
from worker.costs import CostModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerHint:
    """From the router: `worker_id` holds the first `blocks` blocks of this request's chain."""

    worker_id: str
    blocks: int


class PeerFetchError(Exception):
    """A peer could not deliver blocks (dead, timed out, refused); the engine recomputes."""


PeerFetcher = Callable[[str, list[BlockHash]], Exported]


def fetch_prefix(
    store: TieredStore,
    costs: CostModel,
    fetcher: PeerFetcher,
    hint: PeerHint,
    hashes: Sequence[BlockHash],
    blocks: Sequence[tuple[int, ...]],
    dtype: torch.dtype,
    counters: Counters,
) -> tuple[Hold, int, int] | None:
    """Fetch blocks [local, hint.blocks) and cache them; (pinned hold of the prefix, first fetched
    block, blocks now held), or None when nothing was fetched."""
    local = store.lookup(hashes, blocks)
    want = list(hashes[local : hint.blocks])
    if not want:
        return None
    if not costs.fetch_pays(len(want), store.shape.block_size):
        counters.add(PEER_FETCH_SKIPPED)
        return None
    try:
        got = fetcher(hint.worker_id, want)
    except PeerFetchError as e:
        log.warning("peer fetch from %s failed, recomputing: %s", hint.worker_id, e)
        counters.add(PEER_FETCH_FAILURES)
        return None
    n = _verified(got, want, blocks[local:])
    if n < len(want) and n < len(got.hashes):
        counters.add(PEER_FETCH_MISMATCHES)
    if n == 0 or tuple(got.kv.shape) != (len(got.hashes), *store.shape.block_dims) or got.kv.dtype != dtype:
        if n:
            counters.add(PEER_FETCH_FAILURES)
        return None
    parent = hashes[local - 1] if local else None
    store.insert(parent, want[:n], blocks[local : local + n], got.kv[:n])
    hold = store.acquire(hashes, blocks)
    counters.add(PEER_FETCHES)
    counters.add(PEER_FETCHED_BLOCKS, max(0, len(hold) - local))
    return hold, local, len(hold)


def _verified(got: Exported, want: Sequence[BlockHash], want_tokens: Sequence[tuple[int, ...]]) -> int:
    """Leading blocks of `got` whose hash and token ids are the ones asked for."""
    n = 0
    for h, toks, want_h, want_toks in zip(got.hashes, got.tokens, want, want_tokens):
        if h != want_h or tuple(toks) != tuple(want_toks):
            break
        n += 1
    return n
