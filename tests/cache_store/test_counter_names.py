"""The strings workers and the router write to the index read back as what was written."""

from cache_store import MetadataIndex
from cache_store.counter_names import (
    PrefixKey,
    miss_reason,
    miss_tokens,
    parse_tenant_counter,
    request_counts,
    tenant_counter,
    worker_request_counts,
)


def test_tenant_counters_round_trip_and_other_counters_are_not_tenants():
    for name in request_counts(10, 4):
        assert parse_tenant_counter(tenant_counter("3f9a0c11d2e4", name)) == ("3f9a0c11d2e4", name)
    assert parse_tenant_counter(tenant_counter("none", "cached_tokens")) == ("none", "cached_tokens")
    assert parse_tenant_counter("routed") is None
    assert parse_tenant_counter(miss_tokens("evicted")) is None


def test_miss_reasons_round_trip():
    assert miss_reason(miss_tokens("held_elsewhere")) == "held_elsewhere"
    assert miss_reason("placement_cache") is None


def test_a_request_counts_what_the_totals_sum():
    by_tier = {"device": 16, "host": 0, "peer": 32}
    counts = worker_request_counts(100, 48, by_tier, 5, 0.0125)
    assert counts["requests"] == 1 and counts["hit_requests"] == 1
    assert counts["hit_tokens_device"] + counts["hit_tokens_peer"] == counts["cached_tokens"] == 48
    assert counts["prefill_tokens"] == 52 and counts["ttft_us_sum"] == 12500
    assert request_counts(7, 0)["hit_requests"] == 0


def test_top_prefixes_read_back_what_the_router_recorded(redis_server):
    idx = MetadataIndex(redis_server.url)
    hot, cold = PrefixKey("ab" * 16, 64, "none"), PrefixKey("cd" * 16, 32, "3f9a0c11d2e4")
    idx.record_prefixes({hot.member(): 3, cold.member(): 1})
    idx.record_prefixes({hot.member(): 2})
    assert idx.top_prefixes(5) == [(*hot, 5), (*cold, 1)]
    assert PrefixKey.parse(hot.member()) == hot
