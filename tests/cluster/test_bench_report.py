"""`prefixcache bench` rewrites BENCHMARKS.md but keeps the sections other benchmark commands wrote."""

from cluster.bench.report import KEEP, kept_sections


def test_sections_after_the_marker_survive_a_rewrite(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    assert kept_sections(path) == ""
    path.write_text("# old suite output\n")
    assert kept_sections(path) == ""
    path.write_text(f"# old suite output\n{KEEP}\n## Cluster scale\nnumbers\n")
    assert kept_sections(path) == f"\n{KEEP}\n## Cluster scale\nnumbers\n"
