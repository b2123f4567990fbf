"""deploy/local-cluster.sh end to end: head + 2 worker nodes + external Redis, token auth on, then the
same commands a real cluster uses: start, submit through Ray client and as a Ray Job, connect from
Python through `ray://`, status, stop. Everything runs in subprocesses (this test process may hold
its own Ray connection)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "local-cluster.sh"
BIN = Path(sys.executable).parent


def run(env, *cmd, timeout=300, check=True):
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=env["WORKDIR"])
    except subprocess.TimeoutExpired as e:  # what it printed so far says which step hung
        raise AssertionError(f"{cmd} ran past {timeout} s\nstderr:\n{_text(e.stderr)[-4000:]}{logs(env)}") from None
    if check and p.returncode != 0:
        raise AssertionError(
            f"{cmd} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr[-4000:]}{logs(env)}"
        )
    return p


def _text(out: bytes | str | None) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else out or ""


def logs(env) -> str:
    """The tails of the script's node logs and of the head's Ray client server logs (where a failed
    `ray://` connection says why)."""
    state = Path(env["WORKDIR"])
    files = sorted(state.glob("*.log")) + sorted(
        Path(state, "ray", "session_latest", "logs").glob("ray_client_server*")
    )
    return "".join(f"\n--- {f.name}:\n{f.read_text(errors='replace')[-3000:]}" for f in files)


@pytest.fixture(scope="module")
def local_cluster():
    state = tempfile.mkdtemp(prefix="pfxlc-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "PREFIXCACHE_LOCAL_DIR": state, "PATH": f"{BIN}:{os.environ['PATH']}", "WORKDIR": state}
    env.pop("RAY_ADDRESS", None)
    try:
        run(env, str(SCRIPT), "up", timeout=720)  # the script gives up by itself within ~11 min
        for line in Path(state, "env").read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value
        yield env
    finally:
        subprocess.run([str(SCRIPT), "down"], env=env, timeout=180)
    assert not Path(state).exists()


SYSTEM = "You are the remote assistant of the rehearsal cluster. " * 10


def test_cluster_commands_end_to_end(local_cluster, tmp_path):
    """The commands in the order an operator runs them: each step relies on what the previous ones
    left (the service, the cached prompts, the request count)."""
    env = local_cluster
    start_two_workers(env)
    batch = write_batch(tmp_path / "batch.jsonl")
    records = submit_through_ray_client(env, batch, tmp_path / "client.jsonl")
    by_id = {r["id"]: r for r in records if r["id"]}
    submit_as_ray_job(env, batch, by_id)
    connect_from_python(env, by_id["r0"]["token_ids"])
    status_then_stop(env)


def start_two_workers(env) -> None:
    started = run(
        env,
        "prefixcache",
        "start",
        "--address",
        env["RAY_ADDRESS"],
        "--redis-url",
        env["PREFIXCACHE_REDIS_URL"],
        "--workers",
        "2",
        "--routers",
        "2",  # every client below is dealt to one of two router replicas
        "--device-cache-gb",
        "0.05",
        "--host-cache-gb",
        "0.05",
    )
    assert "service 'default' is up: 2 workers, 2 router(s)" in started.stdout
    nodes = {line.split("node=")[1] for line in started.stdout.splitlines() if "node=" in line}
    assert len(nodes) == 2, started.stdout  # one worker per worker node (the head has 1 CPU)
    assert env["PREFIXCACHE_REDIS_URL"].split("@")[0].split(":")[-1] not in started.stdout  # password not printed


def write_batch(path: Path) -> Path:
    """8 requests sharing one system prompt, and a broken line 5 between them."""
    lines = [json.dumps({"prompt": SYSTEM + f"Question {i}?", "max_new_tokens": 6, "id": f"r{i}"}) for i in range(8)]
    path.write_text("\n".join(lines[:4] + ["{broken"] + lines[4:]) + "\n")
    return path


def submit_through_ray_client(env, batch: Path, out: Path) -> list[dict]:
    p = run(
        env,
        "prefixcache",
        "submit",
        str(batch),
        "--address",
        env["PREFIXCACHE_CLIENT"],
        "--out",
        str(out),
        "--no-progress",
        check=False,
    )
    assert p.returncode == 1, p.stderr + logs(env)  # one bad line
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["line"] for r in records] == list(range(1, 10))
    assert "line 5: invalid JSON" in records[4]["error"]
    good = [r for r in records if r["error"] is None]
    assert len(good) == 8 and sum(r["cached_tokens"] > 0 for r in good) >= 5
    return records


# The CLI in-process, then a line to stdout: that line is missing if the command closed stdout.
AFTER_MAIN = "import sys; from cluster.cli.main import main; rc = main(sys.argv[1:]); print('exit', rc); sys.exit(rc)"


def submit_as_ray_job(env, batch: Path, by_id: dict[str, dict]) -> None:
    """The same batch as a Ray Job, results to stdout: the same answers, now from the cache."""
    cmd = [sys.executable, "-c", AFTER_MAIN, "submit", str(batch), "--jobs", env["PREFIXCACHE_JOBS"], "--out", "-"]
    p = run(env, *cmd, check=False, timeout=400)
    assert p.returncode == 1 and "Ray Job" in p.stderr, p.stderr
    *results, last = p.stdout.splitlines()
    assert last == "exit 1", p.stdout[-2000:]
    job_records = [json.loads(x) for x in results]
    assert len(job_records) == 9
    for r in job_records:
        if r["error"] is None:
            assert r["token_ids"] == by_id[r["id"]]["token_ids"]  # same answers, now from cache
            assert r["cached_tokens"] > 0


def connect_from_python(env, r0_tokens: list[int]) -> None:
    script = (
        "import json, sys\n"
        "from cluster import Cluster\n"
        f"c = Cluster.connect({env['PREFIXCACHE_CLIENT']!r})\n"
        f"[r] = c.generate([{SYSTEM!r} + 'Question 0?'], max_new_tokens=6)\n"
        "s = c.stats()\n"
        "print(json.dumps({'tokens': list(r.token_ids), 'cached': r.cached_tokens, 'url': c.redis_url,"
        " 'requests': s['totals']['requests']}))\n"
        "c.shutdown()\n"
    )
    p = run(env, sys.executable, "-c", script)
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["tokens"] == r0_tokens and got["cached"] > 0
    assert got["url"] == env["PREFIXCACHE_REDIS_URL"]
    assert got["requests"] >= 17  # both batches' 16 requests and this one


def status_then_stop(env) -> None:
    status = run(env, "prefixcache", "status", "--address", env["PREFIXCACHE_CLIENT"])
    assert "hit rate" in status.stdout and "worker-1" in status.stdout
    assert "routers 2\n" in status.stdout, status.stdout  # both replicas answered
    assert status.stdout.count("ms/token") == 2 and "fetching pays from" in status.stdout, status.stdout

    run(env, "prefixcache", "stop", "--address", env["RAY_ADDRESS"])
    gone = run(env, "prefixcache", "status", "--address", env["RAY_ADDRESS"], check=False)
    assert gone.returncode == 2 and "no prefixcache service" in gone.stderr


def test_a_node_that_cannot_start_fails_up_with_its_log():
    """A worker node that exits at once (here: a bad --num-cpus) is tried 3 times, then `up` fails
    by itself, naming the node and showing its log; `down` stops the head and Redis it started."""
    state = tempfile.mkdtemp(prefix="pfxlf-", dir="/tmp")
    env = {**os.environ, "PREFIXCACHE_LOCAL_DIR": state, "CPUS_PER_NODE": "two", "WORKDIR": state}
    env["PATH"] = f"{BIN}:{os.environ['PATH']}"
    env.pop("RAY_ADDRESS", None)
    try:
        p = run(env, str(SCRIPT), "up", timeout=300, check=False)
        assert p.returncode == 1, p.stderr
        assert "worker node 1 exited while starting (try 3 of 3)" in p.stderr, p.stderr
        assert "local cluster up failed: worker node 1 exited while starting, 3 times" in p.stderr
        assert "'two' is not a valid integer" in p.stderr  # ray's own words, from the node's log
        pids = [int(Path(state, f).read_text()) for f in ("head.pid", "redis.pid")]
    finally:
        subprocess.run([str(SCRIPT), "down"], env=env, timeout=180)
    assert not Path(state).exists()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
