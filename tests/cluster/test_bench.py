"""`prefixcache bench --quick` end to end: one smoke run, no timing assertions (timings are reported,
in BENCHMARKS.md, not asserted)."""

from __future__ import annotations

import json

import pytest

from cluster.bench.suite import run_suite

from .helpers import SUITE_HEADINGS


@pytest.mark.slow
def test_quick_bench_writes_the_report(ray_local, tmp_path):
    results = run_suite(True, tmp_path, log=lambda *a: None)
    text = (tmp_path / "BENCHMARKS.md").read_text()
    for heading in (*SUITE_HEADINGS, "## Batching: one worker under closed-loop concurrency"):
        assert heading in text
    for mode in (
        "a. plain",
        "b. transformers prompt-cache recipe",
        "c. per-worker caches",
        "d. prefixcache",
        "e. prefixcache, small device tier",
    ):
        assert mode in text
    for plot in ("ttft_cdf.png", "speedup_vs_prefix.png", "hit_rate_vs_workers.png"):
        assert (tmp_path / "bench-plots" / plot).stat().st_size > 5000
    saved = json.loads((tmp_path / "bench-results.json").read_text())
    assert saved["sizes"]["questions"] == results["sizes"]["questions"]
    # counts, not timings: every warm sweep request reused exactly its prefix
    assert all(s["cached_tokens"] == s["prefix_tokens"] for s in results["inproc"]["sweep"])
    svc = results["service"]["modes"]
    assert all(r["cached_tokens"] == 0 for r in results["inproc"]["shared"]["a"])
    assert sum(r["cached_tokens"] for r in svc["d"]["shared"]) > 0
    assert sum(r["cached_tokens"] for r in svc["d"]["chats"]) > 0
    assert all(r["cached_tokens"] == 0 for r in svc["d"]["cold"])
    batching = results["batching"]["runs"]
    for key, run in batching.items():  # every mode served every request with the asked-for length
        assert run["requests"] == len(run["samples"]) > 0, key
        assert all(s["new_tokens"] == results["batching"]["sizes"]["new_tokens"] for s in run["samples"]), key
    assert batching["shared/4/i"]["hit_rate"] > 0 and batching["cold/4/i"]["hit_rate"] == 0
    assert batching["shared/4/iv"]["hit_rate"] == 0
