"""Batch files: one request per JSONL line in, one result per line out.

    {"prompt": "...", "max_new_tokens": 32, "temperature": 0, "cache_salt": "...", "id": "..."}

A line that is not valid JSON, not an object, has unknown fields, bad
values, or is longer than `max_line_bytes` becomes an error record that
names its line number; every other line still runs. Blank lines are skipped.
Lines are read with a bounded `readline`, so one huge line cannot exhaust memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import IO, Any, NamedTuple

from worker.request import ErrorKind, Request, Result

MAX_LINE_BYTES = 4 << 20
# A Ray Job's log is the only output its submitter can read back (status and submit-time metadata
# aside), and Ray and Python write to it too: the job marks its own lines and the submitter keeps
# only those. Each marker starts with a control character (RS), which json.dumps always escapes:
# no record, whatever text it carries, can hold a marker.
RESULT_MARKER = "\x1ePREFIXCACHE-RESULT "  # before each result record
SUMMARY_MARKER = "\x1ePREFIXCACHE-SUMMARY "  # before the batch's one-line summary


class Line(NamedTuple):
    number: int
    request: Request | None
    error: str | None


def read_requests(f: IO[bytes], max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Line]:
    number = 0
    while True:
        raw = f.readline(max_line_bytes + 1)
        if not raw:
            return
        number += 1
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                continue  # skip the remainder of the oversized line
            yield Line(number, None, f"line {number}: longer than {max_line_bytes} bytes; shorten it or split the job")
            continue
        yield parse_line(number, raw)


def parse_line(number: int, raw: bytes) -> Line:
    text = raw.strip()
    if not text:
        return Line(number, None, None)
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        return Line(number, None, f"line {number}: invalid JSON ({msg})")
    if not isinstance(obj, dict):
        return Line(number, None, f'line {number}: expected a JSON object with a "prompt", got {type(obj).__name__}')
    if isinstance(obj.get("stop"), list) and not all(isinstance(s, str) for s in obj["stop"]):
        return Line(number, None, f"line {number}: stop must be a list of strings")
    try:
        req = Request.from_dict(obj)
    except (TypeError, ValueError) as e:
        return Line(number, None, f"line {number}: {e}")
    problem = req.problem()
    if problem:
        return Line(number, None, f"line {number}: {problem}")
    return Line(number, req, None)


def result_record(number: int, result: Result) -> dict[str, Any]:
    return {"line": number, **result.to_dict()}


def error_record(number: int, error: str, id: str | None = None) -> dict[str, Any]:
    return {"line": number, **Result.failed(error, ErrorKind.BAD_REQUEST, id=id).to_dict()}


def dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False)


def marked_lines(log: str, marker: str) -> list[str]:
    """The text after `marker` on each line of a Ray Job's log that has it. Split on "\\n" alone: a
    record may hold U+2028 or U+0085 (json.dumps keeps them raw), which str.splitlines() would break
    on. The marker may sit after the start of a line, behind a partial line the job's stderr left."""
    return [line.partition(marker)[2] for line in log.split("\n") if marker in line]
