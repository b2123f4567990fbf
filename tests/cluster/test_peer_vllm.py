"""`python -m cluster.bench.peer_vllm`: our side of `--quick` end to end (vLLM's side needs a 3.5 GB
venv of its own and stays out of the suite), the plan both sides are fed, and how the report
counts agreement and writes its section. Timings are reported, never asserted."""

from __future__ import annotations

import json

import pytest

from cluster.bench import peer_vllm as pv


@pytest.mark.slow
def test_quick_run_of_our_side(tmp_path):
    lines: list[str] = []
    res = pv.main(
        ["--quick", "--sides", "ours", "--out", str(tmp_path), "--work", str(tmp_path / "work")], lines.append
    )
    saved = json.loads((tmp_path / pv.RESULTS).read_text())
    assert saved["sides"] == ["ours"] and saved["quick"]
    phases, size = saved["raw"]["ours"]["phases"], pv.QUICK
    for name, ph in phases.items():  # every request made exactly its token count: EOS was ignored
        want = saved["phases"][name]["max_tokens"]
        assert ph["records"] and all(len(r["tokens"]) == want for r in ph["records"]), name
        assert all(len(r["stamps"]) == want for r in ph["records"]), name
    stats = res["summary"]["stats"]["ours"]
    # reset_prefix_cache before each cold run: a cold prompt reuses nothing (the second time too, after
    # its warm rerun), its warm rerun every full block
    assert size.single_repeats >= 2
    for k in range(size.single_repeats):
        assert stats[f"single cold {k}"]["cached_tokens"] == 0
        assert stats[f"single warm {k}"]["cached_tokens"] >= stats[f"single warm {k}"]["prompt_tokens"] - 16
    # warm system prompts are served from the cache for every request
    warm = phases["at once, warm"]["records"]
    assert all(r["cached"] >= size.system_tokens - 16 for r in warm)
    report = "\n".join(lines)
    assert pv.SECTION in report and "| at once, warm | ours |" in report
    assert not (tmp_path / "BENCHMARKS.md").exists()  # --quick never writes the report


def test_plan_feeds_shared_prefixes_of_the_asked_lengths():
    from worker import smollm2

    p = pv.plan(pv.QUICK, smollm2.model_dir())
    by = {ph["name"]: ph for ph in p["phases"]}
    s = pv.QUICK
    gsp = by["generated shared prefix"]["prompts"]
    assert len(gsp) == s.gsp_groups * s.gsp_prompts
    assert all(len(x) == s.gsp_system + s.gsp_question for x in gsp)
    assert len({tuple(x[: s.gsp_system]) for x in gsp}) == s.gsp_groups  # one system prompt per group
    chats = by["at once, warm"]["prompts"]
    assert len(chats) == s.at_once and len({tuple(c) for c in chats}) == s.at_once  # no request repeats
    assert len(by["at once, warm"]["warmup"]) == s.systems and not by["at once, cold"]["warmup"]
    assert [by[f"closed loop c={c}"]["concurrency"] for c in s.concurrency] == list(s.concurrency)
    assert by["single warm 0"]["prompts"] == by["single cold 0"]["prompts"] and not by["single warm 0"]["reset"]
    longest = max(len(x) + ph["max_tokens"] for ph in p["phases"] for x in ph["prompts"])
    assert longest <= p["max_model_len"]


def _record(tokens, submit=0.0, step=0.1, cached=0):
    return {
        "prompt": 10,
        "submit": submit,
        "tokens": tokens,
        "stamps": [submit + step * (i + 1) for i in range(len(tokens))],
        "cached": cached,
        "done": 0.0,
    }


def _side(phases, startup=1.0):
    return {"phases": phases, "startup_s": startup}


def test_agreement_counts_requests_equal_token_for_token():
    ours = {"at once, warm": {"wall_s": 1.0, "records": [_record([1, 2]), _record([3, 4]), _record([5, 6])]}}
    peer = {"at once, warm": {"wall_s": 0.5, "records": [_record([1, 2]), _record([3, 9]), _record([5, 6])]}}
    out = {"phases": {"at once, warm": {"max_tokens": 2}}, "raw": {"ours": _side(ours), "vllm": _side(peer)}}
    summ = pv.summarize(out)
    assert summ["agree"] == {"vllm": {"at once, warm": 2}}
    assert summ["stats"]["vllm"]["at once, warm"]["out_tok_per_s"] == pytest.approx(12.0)
    assert summ["stats"]["ours"]["at once, warm"]["ttft_p50_s"] == pytest.approx(0.1)


def test_a_request_cut_short_is_an_error_not_a_number():
    ours = {"at once, warm": {"wall_s": 1.0, "records": [_record([1, 2]), _record([3])]}}
    out = {"phases": {"at once, warm": {"max_tokens": 2}}, "raw": {"ours": _side(ours)}}
    with pytest.raises(RuntimeError, match="token count other than 2"):
        pv.summarize(out)


def test_section_replaces_its_old_self_and_keeps_the_rest(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Before\n\nkept\n")
    pv.write_section([pv.SECTION, "", "first"], path)
    pv.write_section([pv.SECTION, "", "second"], path)
    text = path.read_text()
    assert text.count(pv.SECTION) == 1 and "second" in text and "first" not in text and "## Before\n\nkept" in text
    path.write_text(text + "\n## After\n\nalso kept\n")
    pv.write_section([pv.SECTION, "", "third"], path)
    text = path.read_text()
    assert "third" in text and "second" not in text and text.endswith("## After\n\nalso kept\n")
