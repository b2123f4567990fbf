"""A Ray Job's log carries a batch's results back: every marked line whole, nothing else."""

from __future__ import annotations

import json

from cluster.cli.jsonl import RESULT_MARKER, SUMMARY_MARKER, dumps, marked_lines


def test_marked_lines_come_back_whole_among_other_output():
    records = [
        {"line": 1, "text": "line\u2028separators\x85and\x1ccontrol\x1echaracters", "error": None},
        {"line": 2, "text": f"an answer quoting {RESULT_MARKER} and {SUMMARY_MARKER}", "error": None},
    ]
    log = (
        "INFO worker.py:1 -- Connecting to existing Ray cluster at address: 10.0.0.1:6379...\n"
        + RESULT_MARKER
        + dumps(records[0])
        + "\n"
        + "a partial stderr line, no newline"  # stdout and stderr share the log
        + RESULT_MARKER
        + dumps(records[1])
        + "\n"
        + "WARNING 9 lines: not ours\n"
        + SUMMARY_MARKER
        + "2 lines: 2 ok, 0 failed, 0 bad lines\n"
    )
    assert [json.loads(x) for x in marked_lines(log, RESULT_MARKER)] == records
    assert marked_lines(log, SUMMARY_MARKER) == ["2 lines: 2 ok, 0 failed, 0 bad lines"]
