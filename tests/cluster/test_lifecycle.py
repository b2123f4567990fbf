"""SIGTERM (what `kill`, docker stop and Kubernetes send) stops `prefixcache demo` and `prefixcache
dashboard` as Ctrl-C does: a clean exit, no native stack dumps, nothing left running, and a request
in flight on the HTTP API finishes first.

Each command runs as a real process in its own session, so every process it starts (Ray's GCS and
raylet, workers, Serve's proxy, Valkey) can be found afterwards by session id.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from cache_store.embedded import free_port
from tests.polling import wait_for

ROOT = Path(__file__).resolve().parents[2]
NATIVE_CRASH = ("Aborted", "Fatal Python error", "*** SIG", "Stack trace", "core dumped", "Traceback")


def launch(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cluster.cli.main", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def wait_for_line(proc: subprocess.Popen, words: str, timeout: float) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if words in line:
            return lines
    raise AssertionError(f"{words!r} never printed; output:\n{''.join(lines)[-4000:]}")


def session_members(sid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, psutil.Error):
            continue
    return out


def terminate_and_check(proc: subprocess.Popen, lines: list[str], timeout: float = 90) -> str:
    """SIGTERM to the command alone; it must exit 0 by itself and leave no process of its session."""
    sid = proc.pid
    proc.send_signal(signal.SIGTERM)
    try:
        rest, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, _ = proc.communicate()
        raise AssertionError(f"no exit {timeout}s after SIGTERM:\n{(''.join(lines) + rest)[-4000:]}") from None
    output = "".join(lines) + rest
    try:
        wait_for(lambda: not session_members(sid), "every process of its session to exit", timeout=15, every=0.5)
    except AssertionError:
        left = session_members(sid)
        names = [" ".join(p.cmdline())[:80] for p in left]
        for p in left:  # stop what this test started before failing on it
            p.kill()
        raise AssertionError(f"left running after SIGTERM: {names}") from None
    assert proc.returncode == 0, output[-4000:]
    assert not any(w in output for w in NATIVE_CRASH), output[-4000:]
    return output


def open_stream(port: int):
    """A streamed chat on the running demo, read up to its first piece of text."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 300,
        "temperature": 0,  # greedy: a sampled end of text would finish it early, not at max_tokens
        "stream": True,
    }
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    while b'"content"' not in response.readline():
        pass
    return response


def test_sigterm_stops_the_demo_and_its_http_api(tmp_path):
    http_port = free_port()
    proc = launch(
        "demo", "--model", "demo", "--workers", "1", "--http-port", str(http_port), "--port", str(free_port())
    )
    try:
        lines = wait_for_line(proc, "Ctrl-C (or SIGTERM)", timeout=240)
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=10) as r:
            assert r.status == 200
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    stream = open_stream(http_port)  # in flight when SIGTERM arrives
    output = terminate_and_check(proc, lines)
    assert "stopped: service, HTTP API and dashboard" in output
    events = [line for line in stream.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]", events[-3:]  # the request in flight finished before the API went
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=5)
        raise AssertionError("the HTTP API still answers")
    except OSError:
        pass  # connection refused: the port is free again


def test_sigterm_stops_the_dashboard(valkey):
    proc = launch("dashboard", "--redis-url", valkey.url, "--port", str(free_port()))
    try:
        lines = wait_for_line(proc, "dashboard on", timeout=60)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    terminate_and_check(proc, lines, timeout=30)
