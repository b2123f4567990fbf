"""`prefixcache bench` rewrites BENCHMARKS.md but keeps the sections other benchmark commands wrote."""

import json
from pathlib import Path

from cluster.bench.batching import SECTION
from cluster.bench.report import KEEP, kept_sections, provenance, put_section, write

from .helpers import SUITE_HEADINGS

RESULTS = Path(__file__).resolve().parents[2] / "bench-results.json"  # the last full suite run


def test_sections_after_the_marker_survive_a_rewrite(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    assert kept_sections(path) == ""
    path.write_text("# old suite output\n")
    assert kept_sections(path) == ""
    path.write_text(f"# old suite output\n{KEEP}\n## Cluster scale\nnumbers\n")
    assert kept_sections(path) == f"\n{KEEP}\n## Cluster scale\nnumbers\n"


def test_write_replaces_the_suite_part_and_keeps_the_rest(tmp_path):
    kept = f"\n{KEEP}\n## Cluster scale\nnumbers\n"
    (tmp_path / "BENCHMARKS.md").write_text("# old suite output\n" + kept)
    results = json.loads(RESULTS.read_text())
    write(results, tmp_path)
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert text.startswith("# Benchmarks\n") and "old suite output" not in text
    assert text.endswith(kept) and text.count(KEEP) == 1
    headings = [line for line in text.split(KEEP)[0].splitlines() if line.startswith("## ")]
    batching = (SECTION,) if "batching" in results else ()
    assert tuple(h.split(" (")[0] for h in headings) == SUITE_HEADINGS + batching
    for plot in ("ttft_cdf.png", "speedup_vs_prefix.png", "hit_rate_vs_workers.png"):
        assert f"](bench-plots/{plot})" in text and (tmp_path / "bench-plots" / plot).stat().st_size > 5000


def test_the_header_names_every_run_that_made_the_numbers():
    results = json.loads(RESULTS.read_text())
    one = {"command": "prefixcache bench", "date": "2026-01-02", "minutes": 9.0}
    results["run"] = one
    results["batching"] = {**results.get("batching", {}), "run": {**one, "minutes": 12.0}}
    assert "in 21.0 minutes; every number below comes from that one run" in provenance(results, "prefixcache bench")
    results["batching"]["run"] = {"command": "prefixcache bench --only batching", "date": "2026-01-03", "minutes": 12}
    text = provenance(results, "prefixcache bench")
    assert "`prefixcache bench` on 2026-01-02 (service part, 9 minutes)" in text
    assert "then `prefixcache bench --only batching` on 2026-01-03 (12 minutes)" in text and "one run" not in text


def test_another_command_replaces_its_own_section_below_the_marker_only(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(
        f"# Benchmarks\n\n## Goals\n\nsuite\n\n{KEEP}\n\n## Scale\n\na\n\n### Detail\n\nb\n\n## Last\n\nz\n"
    )
    put_section(path, "## Load", ["## Load", "", "first", ""])
    assert path.read_text().endswith("## Last\n\nz\n\n## Load\n\nfirst\n")  # appended
    put_section(path, "## Load", ["## Load", "", "second", ""])
    put_section(path, "## Scale", ["## Scale", "", "new", ""])  # its subsections go with it
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\n## Goals\n\nsuite\n\n" + KEEP)
    assert text.split(KEEP)[1] == "\n\n## Scale\n\nnew\n\n## Last\n\nz\n\n## Load\n\nsecond\n"
    assert kept_sections(path) == "\n" + KEEP + text.split(KEEP)[1]  # what a suite run keeps


def _disk_results(speedup: float) -> dict:
    row = {"prefix_tokens": 2048, "recompute": 0.3, "device": 0.01, "host": 0.02, "disk": 0.3 / speedup}
    costs = {"prefill_s_per_token": 1e-4, "disk_read_s_per_block": 1e-4, "disk_read_overhead_s": 1e-4}
    model = {
        "ttft": {
            "rows": [{**row, "disk_speedup": speedup, "read_gbps": 1.5}],
            "costs": {**costs, "disk_crossover_blocks": 0.1},
        },
        "restart": {"with_disk": {"before": 0.9, "after": 0.88}, "without_disk": {"before": 0.9, "after": 0.5}},
        "small_tiers": {
            "small device + host + disk": {
                "hit_rate": 0.9,
                "mean_ttft_s": 0.1,
                "p50_ttft_s": 0.1,
                "disk_hit_blocks": 5,
                "disk_writes_dropped": 0,
            }
        },
    }
    return {
        "models": {"demo": model},
        "rounds": 1,
        "requests": 20,
        "where": "test",
        "minutes": 1.0,
        "date": "d",
        "command": "c",
    }


def test_the_disk_benchmark_section_is_kept_by_the_suite_and_replaced_by_its_next_run(tmp_path):
    from cluster.bench.disk import SECTION as DISK
    from cluster.bench.disk import report, write_section

    path = tmp_path / "BENCHMARKS.md"
    path.write_text(f"# suite\n{KEEP}\n## Cluster scale\nnumbers\n")
    write_section(path, report(_disk_results(4.0)))
    assert "4.0x faster than recompute (goal 3x: met)" in path.read_text()
    write_section(path, report(_disk_results(2.0)))
    text = path.read_text()
    assert text.count(DISK) == 1 and "goal 3x: not met" in text and "4.0x" not in text
    assert "numbers" in kept_sections(path) and DISK in kept_sections(path)
