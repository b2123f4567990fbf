"""Distinct vs stored blocks on /api/stats and /metrics, from a real index (no Ray needed)."""

from cache_store import MetadataIndex, block_chain, root_hash
from cluster.dashboard.collect import collect
from cluster.dashboard.metrics import render


def test_distinct_and_stored_blocks_reach_the_snapshot_and_metrics(valkey):
    idx = MetadataIndex(valkey.url)
    gens = {w: idx.register(w) for w in ("a", "b", "c")}
    chain = block_chain(root_hash("m", None), list(range(64)), 16)  # 4 blocks
    idx.publish("a", gens["a"], [("add", h, "device") for h in chain])
    idx.publish("b", gens["b"], [("add", h, "device") for h in chain[:3]])
    idx.publish("c", gens["c"], [("add", h, "host") for h in chain[:1]])
    snap = collect(idx)
    assert snap["blocks"] == {"stored": 8, "distinct": 4, "duplicates": 4}
    text = render(snap).decode()
    assert "prefixcache_blocks_stored 8.0" in text
    assert "prefixcache_blocks_distinct 4.0" in text
