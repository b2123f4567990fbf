"""The names the layers share through the index: counters, tiers, lease fields, key formats.

Workers and the router write counters to Redis; `cluster.service.stats`, the
dashboard and the simulator read them back by name. This module is the only
place that spells those names and key formats, so a writer and a reader can
never drift apart: build a key here, parse it here. Writers import the
constants (`tests/test_names.py` fails on a counter written as a literal).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

# The owner the router's counters are filed under, beside the worker ids.
ROUTER = "router"

# The cache's tiers (`cache_store.tree.Tier`), and PEER: a cached token fetched from another worker.
DEVICE = "device"
HOST = "host"
DISK = "disk"
PEER = "peer"
HIT_TIERS = (DEVICE, HOST, PEER)  # where a cached prompt token came from
DROP_TIERS = (DEVICE, HOST, DISK)  # a dropped block left this tier for nowhere

# Once per finished request, by its worker and (per tenant, the first four) by the router.
REQUESTS = "requests"
HIT_REQUESTS = "hit_requests"  # requests with any cached prompt token
PROMPT_TOKENS = "prompt_tokens"
CACHED_TOKENS = "cached_tokens"
PREFILL_TOKENS = "prefill_tokens"
GENERATED_TOKENS = "generated_tokens"
TTFT_US_SUM = "ttft_us_sum"  # integer microseconds: index counters are HINCRBY

# The engine's (worker.engine).
REJECTED_REQUESTS = "rejected_requests"  # refused at submit: the request or its prompt was bad
FAILED_REQUESTS = "failed_requests"  # ended by an engine fault
CANCELLED_REQUESTS = "cancelled_requests"
PREEMPTIONS = "preemptions"  # running requests sent back to the queue for lack of blocks
AUDIT_CHECKED = "audit_checked"  # cache hits checked against a fresh prefill of the same prompt
AUDIT_MISMATCHES = "audit_mismatches"  # of those, KV that did not match: must stay 0

# Peer fetches (worker.peer).
PEER_FETCHES = "peer_fetches"
PEER_FETCHED_BLOCKS = "peer_fetched_blocks"
PEER_FETCH_SKIPPED = "peer_fetch_skipped"  # recomputing was faster than fetching
PEER_FETCH_FAILURES = "peer_fetch_failures"
PEER_FETCH_MISMATCHES = "peer_fetch_mismatches"  # the peer's blocks did not match the chain: dropped

# The tiered store's (cache_store.tiered).
INSERTED_BLOCKS = "inserted_blocks"
INSERT_SKIPPED_BLOCKS = "insert_skipped_blocks"  # no room in any memory tier
PROMOTED_BLOCKS = "promoted_blocks"  # host -> device for a hit
SPILLED_BLOCKS = "spilled_blocks"  # demoted to a lower tier
EXPORTED_BLOCKS = "exported_blocks"  # read out for a peer
HASH_COLLISIONS = "hash_collisions"  # same hash, other tokens: never served

# The router's (cluster.routing.router, cluster.service.router_actor), filed under ROUTER.
ROUTED = "routed"
PEER_HINTS = "peer_hints"  # placements that told the worker to fetch from a peer
COLD_REQUESTS = "cold_requests"  # no prompt token served from cache
PLACEMENT_INDEX_DOWN = "placement_index_down"  # placed without the index (Redis unreachable)
REJECTED = "rejected"  # refused by the router: a bad prompt or tenant
FAILED_NO_WORKER = "failed_no_worker"
RETRIES = "retries"  # sent again to another worker after its worker died
WORKER_ERRORS = "worker_errors"
# Why a prompt block missed (token-weighted `miss_tokens` counters); `Router.account` judges each.
NEVER_SEEN = "never_seen"
EVICTED = "evicted"
HELD_ELSEWHERE = "held_elsewhere"
MISS_REASONS = (NEVER_SEEN, EVICTED, HELD_ELSEWHERE)

# The disk tier's counters (cache_store.disk, cache_store.tiered). Bytes and microseconds are
# summed separately so that any window's throughput is bytes / time spent in the I/O calls.
DISK_READ_BLOCKS = "disk_read_blocks"  # blocks served from disk (checksums good): the disk tier's hits
DISK_READ_BYTES = "disk_read_bytes"
DISK_READ_US = "disk_read_us"
DISK_WRITTEN_BLOCKS = "disk_written_blocks"
DISK_WRITE_BYTES = "disk_write_bytes"
DISK_WRITE_US = "disk_write_us"
DISK_WRITES_DROPPED = "disk_writes_dropped"  # blocks that left memory unwritten: the disk was slow or full
DISK_WRITE_ERRORS = "disk_write_errors"  # writes the OS refused (EIO, ENOSPC on a sparse file)
DISK_CORRUPT_SLOTS = "disk_corrupt_slots"  # reads whose header or payload checksum failed: a miss
DISK_READ_SKIPPED = "disk_read_skipped_blocks"  # disk hits not read because recomputing was faster
DISK_RECOVERED_BLOCKS = "disk_recovered_blocks"  # rebuilt from slot headers at start
DISK_IGNORED_SLOTS = "disk_ignored_slots"  # slots of another model or format, torn or orphaned: reused
DISK_RESTORED_PINS = "disk_restored_pins"  # operator pins made again at start from the disk tier
DISK_COUNTERS = (
    DISK_READ_BLOCKS,
    DISK_READ_BYTES,
    DISK_READ_US,
    DISK_WRITTEN_BLOCKS,
    DISK_WRITE_BYTES,
    DISK_WRITE_US,
    DISK_WRITES_DROPPED,
    DISK_WRITE_ERRORS,
    DISK_CORRUPT_SLOTS,
    DISK_READ_SKIPPED,
    DISK_RECOVERED_BLOCKS,
    DISK_IGNORED_SLOTS,
    DISK_RESTORED_PINS,
)


def disk_summary(counters: Mapping[str, int], bytes_used: int, bytes_capacity: int) -> dict[str, float]:
    """A worker's disk tier in the numbers people read (the worker's stats, the dashboard, /metrics):
    bytes used and capacity, hits (blocks served from disk), read and write GB/s while the I/O calls
    ran (bytes over the time spent in them: the bandwidth reached, not an average over idle time),
    dropped writes and corrupt slots found."""
    c = {k: int(counters.get(k, 0) or 0) for k in DISK_COUNTERS}
    return {
        "bytes_used": int(bytes_used),
        "bytes_capacity": int(bytes_capacity),
        "hits": c[DISK_READ_BLOCKS],
        "read_gbps": c[DISK_READ_BYTES] / c[DISK_READ_US] / 1e3 if c[DISK_READ_US] else 0.0,
        "write_gbps": c[DISK_WRITE_BYTES] / c[DISK_WRITE_US] / 1e3 if c[DISK_WRITE_US] else 0.0,
        "writes_dropped": c[DISK_WRITES_DROPPED],
        "write_errors": c[DISK_WRITE_ERRORS],
        "corrupt_slots": c[DISK_CORRUPT_SLOTS],
        "read_skipped": c[DISK_READ_SKIPPED],
        "recovered_blocks": c[DISK_RECOVERED_BLOCKS],
        "restored_pins": c[DISK_RESTORED_PINS],
    }


_TENANT = "t."  # tenant counters: "t.<tenant label>.<request counter>"
_MISS = "miss_tokens_"


def request_counts(prompt_tokens: int, cached_tokens: int) -> dict[str, int]:
    """What one finished request adds: to its worker's counters, and to its tenant's in the router."""
    return {
        REQUESTS: 1,
        HIT_REQUESTS: int(cached_tokens > 0),
        PROMPT_TOKENS: prompt_tokens,
        CACHED_TOKENS: cached_tokens,
    }


def worker_request_counts(
    prompt_tokens: int, cached_tokens: int, by_tier: Mapping[str, int], generated_tokens: int, ttft_s: float
) -> dict[str, int]:
    """What one finished request adds to its worker's counters (`by_tier`: cached tokens per HIT_TIERS)."""
    return {
        **request_counts(prompt_tokens, cached_tokens),
        **{hit_tokens(t): by_tier[t] for t in HIT_TIERS},
        PREFILL_TOKENS: prompt_tokens - cached_tokens,
        GENERATED_TOKENS: generated_tokens,
        TTFT_US_SUM: int(ttft_s * 1e6),
    }


def hit_tokens(tier: str) -> str:
    return f"hit_tokens_{tier}"


def dropped_blocks(tier: str) -> str:
    return f"dropped_blocks_{tier}"


def placements(reason: str) -> str:
    """The router's count of placements made for one reason (`cluster.routing.policies.Placement.reason`)."""
    return f"placement_{reason}"


def miss_tokens(reason: str) -> str:
    return f"{_MISS}{reason}"


def miss_reason(name: str) -> str | None:
    """The reason of a `miss_tokens` counter name; None for any other counter."""
    return name[len(_MISS) :] if name.startswith(_MISS) else None


def tenant_counter(tenant: str, name: str) -> str:
    """A request counter of one tenant; `tenant` is a label (`cluster.router.tenant_label`), which has no dot."""
    return f"{_TENANT}{tenant}.{name}"


def parse_tenant_counter(key: str) -> tuple[str, str] | None:
    """(tenant label, counter name) of a tenant counter; None for any other counter."""
    if not key.startswith(_TENANT):
        return None
    tenant, name = key[len(_TENANT) :].split(".", 1)
    return tenant, name


class PrefixKey(NamedTuple):
    """A cached prefix as the router counts its hits: its last block, its length, its tenant."""

    last_block: str  # hex
    tokens: int
    tenant: str

    def member(self) -> str:
        """The sorted-set member in the index: "<last block hex>:<tokens>:<tenant>"."""
        return f"{self.last_block}:{self.tokens}:{self.tenant}"

    @classmethod
    def parse(cls, member: str) -> PrefixKey:
        hx, tokens, tenant = member.split(":", 2)
        return cls(hx, int(tokens), tenant)


# Added once per finished request, by its worker and (per tenant) by the router.
REQUEST_COUNTERS = tuple(request_counts(0, 0))

# Worker counters that `cluster.service.stats` totals across workers (every one monotonic).
SUMMED = (
    *worker_request_counts(0, 0, dict.fromkeys(HIT_TIERS, 0), 0, 0.0),
    REJECTED_REQUESTS,
    SPILLED_BLOCKS,
    *(dropped_blocks(t) for t in DROP_TIERS),
    PROMOTED_BLOCKS,
    INSERTED_BLOCKS,
    PEER_FETCHES,
    PEER_FETCH_FAILURES,
    PEER_FETCHED_BLOCKS,
    AUDIT_CHECKED,
    AUDIT_MISMATCHES,
    *DISK_COUNTERS,
)


class LeaseField:
    """Fields of a worker's lease hash that the dashboard reads: the worker writes them (its engine's
    info and gauges, its actor's queue), the dashboard parses them; neither spells them itself."""

    HEARTBEAT = "hb"  # the lease's last heartbeat, unix seconds (written by the heartbeat script)
    DEVICE = "device"
    BLOCK_BYTES = "block_bytes"
    PREFILL_US_PER_TOKEN = "prefill_us_per_token"
    QUEUE = "queue"  # requests on the worker now
    SERVED = "served"  # requests it finished
    DISK_BYTES = "disk_bytes"  # bytes of the disk tier's slots in use (headers included)
    DISK_CAPACITY_BYTES = "disk_capacity_bytes"  # bytes of its slab files

    @staticmethod
    def blocks(tier: str) -> str:
        return f"{tier}_blocks"

    @staticmethod
    def capacity(tier: str) -> str:
        return f"{tier}_capacity"
