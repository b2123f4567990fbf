"""The CLI's commands, one function each: `args` in, exit code out. User mistakes raise UserError."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.cli.lifecycle import stop_on_sigterm

if TYPE_CHECKING:
    from cluster.cli.jsonl import Line

EXIT_OK, EXIT_PARTIAL = 0, 1


class UserError(Exception):
    """Something the user can fix; printed without a traceback."""


@contextmanager
def _ray(address: str):
    """Connect to a running Ray cluster (or Ray client address) for the duration of a command."""
    import ray

    from cluster.service.raylink import init_ray
    from worker.names import NAMESPACE

    if ray.is_initialized():  # embedded use (tests, notebooks): reuse the connection
        yield ray
        return
    try:
        init_ray(address, namespace=NAMESPACE, log_to_driver=False, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(
            f"could not connect to a Ray cluster at {address!r}: {e}. Start one with `ray start --head`, "
            "pass --address HOST:6379 (on a node) or ray://HOST:10001 (Ray client), and if the cluster uses "
            "token auth set RAY_AUTH_TOKEN (see README: Running on a cluster)"
        ) from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _service_error(fn, *a, **kw):
    from cluster.service.spec import ServiceError

    try:
        return fn(*a, **kw)
    except (ServiceError, ValueError) as e:
        raise UserError(str(e)) from None


# ---- commands -------------------------------------------------------------------------


def demo(args) -> int:
    from cluster.cli.demo import run_demo
    from cluster.service.spec import ServiceError

    if args.workers < 1:
        raise UserError("--workers must be at least 1")
    try:
        run_demo(
            model=args.model,
            workers=args.workers,
            http_port=args.http_port,
            dashboard=not args.no_dashboard,
            port=args.port,
            wait=not args.no_wait,
            disk_cache_dir=None if args.no_disk_cache else _disk_dir(args.disk_cache_dir),
            disk_cache_gb=args.disk_cache_gb,
        )
    except ServiceError as e:
        raise UserError(str(e)) from None
    return EXIT_OK


def start(args) -> int:
    from cache_store import redact
    from cluster.service.launch import start_service
    from cluster.service.spec import ServiceSpec

    if args.allowed_origins is not None:  # refused before anything starts
        from cluster.http.cors import parse_origins

        _service_error(parse_origins, args.allowed_origins)
    spec = _service_error(
        ServiceSpec,
        service=args.service,
        model=args.model,
        workers=args.workers,
        routers=args.routers,
        redis_url=args.redis_url,
        device_cache_gb=args.device_cache_gb,
        host_cache_gb=args.host_cache_gb,
        disk_cache_dir=_disk_dir(args.disk_cache_dir),
        disk_cache_gb=args.disk_cache_gb,
        block_size=args.block_size,
        policy=args.policy,
        eviction=args.eviction,
        dtype=args.dtype,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        tenant_mode=args.tenant_mode,
        audit_fraction=args.audit_fraction,
        max_running=args.max_running,
        max_batch_tokens=args.max_batch_tokens,
        attention=args.attention,
        linear=args.linear,
        forward=args.forward,
        cuda_graphs=args.cuda_graphs,
        detached=True,
    )
    with _ray(args.address) as ray, stop_on_sigterm():  # a SIGTERM mid-start undoes what was started
        started = _service_error(start_service, spec)
        cfg = ray.get(started.router.config.remote())
        health = ray.get([h.health.remote() for h in started.workers.values()])
        url = _service_error(_start_http, args, spec.service) if args.http_port is not None else None
    print(
        f"service {spec.service!r} is up: {len(health)} workers, {spec.routers} router(s), "
        f"model {spec.model!r}, policy {spec.policy}"
    )
    for h in health:
        print(f"  {h['worker_id']}: {h['device']} gpu_ids={h['gpu_ids']} node={h['node_id'][:12]}")
    print(f"  index: {redact(cfg['redis_url'])}")
    if url:
        from cluster.http.server import binding_note

        print(f"  OpenAI-compatible API: {url}/v1   ({binding_note(args.http_host, bool(args.api_keys))})")
    print("next:")
    print(f"  prefixcache submit requests.jsonl --address ray://<head>:10001 --service {spec.service}")
    print(f"  prefixcache dashboard --redis-url <the URL above, with its password> --service {spec.service}")
    print(f"  prefixcache stop --address {args.address} --service {spec.service}")
    return EXIT_OK


def _disk_dir(path: str | None) -> str | None:
    """--disk-cache-dir as the absolute path the workers need (they run in directories of their own)."""
    return None if path is None else os.path.abspath(os.path.expanduser(path))


def _start_http(args, service: str) -> str:
    """The HTTP API for a just-started service; if it cannot start, the service is stopped again."""
    from cluster.http.server import start_http
    from cluster.service.launch import stop_service

    try:
        return start_http(
            service, args.http_port, host=args.http_host, api_keys=args.api_keys, allowed_origins=args.allowed_origins
        )
    except BaseException:
        stop_service(service)
        raise


def add_workers(args) -> int:
    from cluster.service.launch import add_workers as add

    if args.n < 1:
        raise UserError("add at least one worker")
    with _ray(args.address):
        added = _service_error(add, args.service, args.n)
    print(f"service {args.service!r}: added {', '.join(added)}")
    return EXIT_OK


def stop(args) -> int:
    from cluster.service.launch import stop_service

    with _ray(args.address):
        _service_error(stop_service, args.service)
    print(f"service {args.service!r} stopped")
    return EXIT_OK


def reset_prefix_cache(args) -> int:
    from cluster.service.launch import reset_prefix_cache as reset

    with _ray(args.address):
        out = _service_error(reset, args.service)
    print(f"service {args.service!r}: {sum(out['workers'].values())} cached blocks dropped")
    for w, n in sorted(out["workers"].items()):
        print(f"  {w}: {n}")
    for w, why in sorted(out["failed"].items()):
        print(f"  {w}: did not answer ({why})")
    return EXIT_PARTIAL if out["failed"] else EXIT_OK


def status(args) -> int:
    from cluster.cli.demo import table
    from cluster.service.client import Cluster

    with _ray(args.address):
        cluster = _service_error(Cluster.connect, args.address, service=args.service)
        s = cluster.stats()
    if args.json:
        print(json.dumps(s, indent=2, default=str))
        return EXIT_OK
    t = s["totals"]
    print(f"service {s['service']!r}: policy {s['policy']}, index {'up' if s['index_available'] else 'UNREACHABLE'}")
    down = [r["replica"] for r in s["routers"] if "error" in r]
    print(f"routers {len(s['routers'])}" + (f" (not answering: replicas {down})" if down else ""))
    print(
        f"requests {t['requests']:,}  hit rate {t['hit_rate']:.1%} (tokens)  prefill tokens saved {t['cached_tokens']:,}"
    )
    rows = []
    for w, info in s["workers"].items():
        c = s["per_worker"].get(w, {})
        rows.append(
            [
                w,
                "yes" if info.get("alive", True) else "NO",
                info.get("queue", "-"),
                c.get("requests", 0),
                f"{c.get('hit_rate', 0):.1%}",
                info.get("device", "-"),
            ]
        )
    print(table(rows, ["worker", "alive", "queue", "requests", "hit rate", "device"]))
    costs = [_crossover_line(w, info["costs"]) for w, info in s["workers"].items() if "costs" in info]
    if costs:
        print("\npeer fetch vs recompute (measured on each worker at start-up):")
        print("\n".join(costs))
    return EXIT_OK


def _crossover_line(worker: str, c: dict) -> str:
    """One worker's measured costs, and from how many blocks pulling KV from a peer beats recomputing it."""
    prefill = f"prefill {c['prefill_s_per_token'] * 1e3:.3f} ms/token"
    if c["transfer_s_per_block"] == float("inf"):
        return f"  {worker}: {prefill}; transfer not measured (one worker): always recompute"
    per_block, overhead = c["transfer_s_per_block"] * 1e3, c["transfer_overhead_s"] * 1e3
    transfer = f"transfer {per_block:.2f} ms/block + {overhead:.1f} ms per fetch"
    n = c["crossover_blocks"]
    verdict = "never pays" if n == float("inf") else f"fetching pays from {max(1, math.ceil(n))} block(s)"
    return f"  {worker}: {prefill}, {transfer}: {verdict}"


def submit(args) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise UserError(f"no such file: {path}")
    if args.window < 1:
        raise UserError("--window must be at least 1")
    out_path = args.out or str(path.with_suffix("")) + ".results.jsonl"
    if args.jobs:
        return _submit_job(args, path, out_path)
    return _submit_client(args, path, out_path, marked=getattr(args, "marked", False))


def _submit_client(args, path: Path, out_path: str, marked: bool = False) -> int:
    """Run a batch through Ray client (or on a node, as a Ray Job's entrypoint when `marked`)."""
    from cluster.cli.jsonl import RESULT_MARKER, SUMMARY_MARKER
    from cluster.service.client import Cluster

    lines = _read_batch(path)
    valid = [line for line in lines if line.request is not None]
    tally = _Tally()
    with _results_out(out_path) as out:
        ordered = _InOrder(out, lines, RESULT_MARKER if marked else "")
        with _ray(args.address):
            cluster = _service_error(Cluster.connect, args.address, service=args.service)
            ordered.flush()  # bad lines before the first request are written at once
            _run_batch(cluster, args, valid, ordered, tally)
    bad_lines = len(lines) - len(valid)
    summary = tally.summary(len(lines), bad_lines) + ("" if out_path == "-" else f"; results in {out_path}")
    print((SUMMARY_MARKER if marked else "") + summary, file=sys.stderr)
    return EXIT_OK if tally.errors == 0 and bad_lines == 0 else EXIT_PARTIAL


def warm(args) -> int:
    """Pre-warm the service with the prompts of a JSONL file; exit 1 if any could not be pinned."""
    from cluster.service.client import Cluster

    path = Path(args.file)
    if not path.is_file():
        raise UserError(f"no such file: {path}")
    lines = _read_batch(path)
    valid = [line for line in lines if line.request is not None]
    with _ray(args.address):
        cluster = _service_error(Cluster.connect, args.address, service=args.service)
        out = cluster.warm([line.request for line in valid], tenant=args.tenant, everywhere=args.everywhere)
    problems = [line.error for line in lines if line.error is not None]
    tokens, workers = 0, set()
    for line, r in zip(valid, out):
        pinned = {w: n for w, n in r.get("workers", {}).items() if n}
        if not pinned:
            problems.append(f"line {line.number}: not pinned: {r.get('error', 'shorter than one cache block')}")
        tokens += sum(pinned.values())
        workers.update(pinned)
    for problem in problems:
        print(problem, file=sys.stderr)
    on = ", ".join(sorted(workers)) or "no worker"
    print(f"{len(lines)} prompts: {len(lines) - len(problems)} pinned ({tokens:,} tokens on {on}), {len(problems)} not")
    return EXIT_OK if not problems else EXIT_PARTIAL


def _read_batch(path: Path) -> list[Line]:
    """Every request line and every bad line of the file (blank lines dropped), numbered."""
    from cluster.cli.jsonl import read_requests

    with open(path, "rb") as f:
        return [line for line in read_requests(f) if line.request is not None or line.error is not None]


@contextmanager
def _results_out(out_path: str):
    """The results file, or stdout for "-": stdout is flushed, never closed (the CLI may run in-process)."""
    if out_path == "-":
        try:
            yield sys.stdout
        finally:
            sys.stdout.flush()
        return
    with open(out_path, "w", encoding="utf-8") as f:
        yield f


class _InOrder:
    """Writes records in input-line order as results arrive out of order: a reader can tail the file."""

    def __init__(self, out, lines: list[Line], marker: str):
        from cluster.cli.jsonl import error_record

        self.out, self.marker = out, marker
        self.order = [line.number for line in lines]
        self.ready = {line.number: error_record(line.number, line.error) for line in lines if line.error}
        self.written = 0

    def add(self, number: int, record: dict) -> None:
        self.ready[number] = record
        self.flush()

    def flush(self) -> None:
        from cluster.cli.jsonl import dumps

        while self.written < len(self.order) and self.order[self.written] in self.ready:
            self.out.write(self.marker + dumps(self.ready.pop(self.order[self.written])) + "\n")
            self.written += 1
        self.out.flush()


class _Tally:
    """Counts for the batch's summary line."""

    def __init__(self):
        self.ok = self.errors = self.prompt = self.cached = 0

    def add(self, result) -> None:
        if not result.ok:
            self.errors += 1
            return
        self.ok += 1
        self.prompt += result.prompt_tokens
        self.cached += result.cached_tokens

    def summary(self, n_lines: int, bad_lines: int) -> str:
        hit = f"{self.cached / self.prompt:.1%}" if self.prompt else "n/a"
        return (
            f"{n_lines} lines: {self.ok} ok, {self.errors} failed, {bad_lines} bad lines; hit rate {hit} "
            f"({self.cached:,} of {self.prompt:,} prompt tokens cached)"
        )


def _run_batch(cluster, args, valid: list[Line], ordered: _InOrder, tally: _Tally) -> None:
    from tqdm import tqdm

    from cluster.cli.jsonl import result_record

    bar = tqdm(total=len(valid), unit="req", file=sys.stderr, disable=args.no_progress)
    for i, result in cluster.submit([line.request for line in valid], tenant=args.tenant, window=args.window):
        ordered.add(valid[i].number, result_record(valid[i].number, result))
        tally.add(result)
        bar.update(1)
    bar.close()


def _submit_job(args, path: Path, out_path: str) -> int:
    """Run the same batch as a Ray Job on the cluster; results come back through the job's log."""
    from ray.job_submission import JobStatus

    from cluster.cli.jsonl import RESULT_MARKER, SUMMARY_MARKER, marked_lines

    client = _jobs_client(args.jobs)
    workdir = Path(tempfile.mkdtemp(prefix="prefixcache-job-"))
    try:
        shutil.copy(path, workdir / "requests.jsonl")
        job_id = _submit_with_retry(client, _job_entrypoint(args), workdir)
        print(f"submitted Ray Job {job_id}", file=sys.stderr)
        status = _wait_until_done(client, job_id)
        logs = client.get_job_logs(job_id)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    with _results_out(out_path) as out:
        out.writelines(record + "\n" for record in marked_lines(logs, RESULT_MARKER))
    summary = marked_lines(logs, SUMMARY_MARKER)
    if status != JobStatus.SUCCEEDED and not summary:
        raise UserError(f"Ray Job {job_id} {status.value} before finishing the batch; its log:\n{logs[-3000:]}")
    outcome = "finished" if status == JobStatus.SUCCEEDED else "finished, some lines failed"
    print(f"Ray Job {job_id} {outcome}: {summary[-1]}", file=sys.stderr)
    return EXIT_OK if status == JobStatus.SUCCEEDED else EXIT_PARTIAL


def _jobs_client(url: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(url)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"could not reach the Ray Jobs API at {url}: {e}") from None


def _job_entrypoint(args) -> str:
    """`submit` again, on a node of the cluster, with its results and summary marked in the job's log."""
    argv = ["prefixcache", "submit", "requests.jsonl", "--address", "auto", "--service", args.service]
    argv += ["--out", "-", "--marked", "--no-progress"] + (["--tenant", args.tenant] if args.tenant else [])
    return shlex.join(argv)  # a shell runs it


def _submit_with_retry(client, entrypoint: str, workdir: Path, patience_s: float = 120.0) -> str:
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(workdir)})
        except RuntimeError as e:  # the head's job agent is still starting: Ray says to retry
            if "try again later" not in str(e) or time.monotonic() > deadline:
                raise UserError(f"the Ray Jobs API refused the job: {e}") from None
            time.sleep(2.0)


def _wait_until_done(client, job_id: str):
    from ray.job_submission import JobStatus

    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while (status := client.get_job_status(job_id)) not in terminal:
        time.sleep(1.0)
    return status


def dashboard(args) -> int:
    if not args.redis_url:
        raise UserError("pass --redis-url (the service's Redis URL, with its password) or set PREFIXCACHE_REDIS_URL")
    from cluster.dashboard.server import DashboardServer

    server = DashboardServer(args.redis_url, service=args.service, host=args.host, port=args.port, token=args.token)
    with stop_on_sigterm():  # before the line that tells whoever started us that we are up
        try:
            server.start()
            print(
                f"dashboard on {server.url} (JSON: /api/stats, Prometheus: /metrics); Ctrl-C to stop", file=sys.stderr
            )
            server.wait()
        except KeyboardInterrupt:
            pass  # Ctrl-C (or SIGTERM) is how the dashboard is meant to stop
        finally:
            server.stop()
    return EXIT_OK


def bench(args) -> int:
    if args.peer:
        if args.only:
            raise UserError("--only picks a part of the suite; --peer runs the side-by-side instead: drop one")
        from cluster.bench import peer_vllm

        peer_vllm.main([*(["--quick"] if args.quick else []), "--out", args.out])
        return EXIT_OK
    from cluster.bench.suite import run_suite

    run_suite(quick=args.quick, out_dir=Path(args.out), only=args.only)
    return EXIT_OK


def simulate(args) -> int:
    from cluster.simulate.command import run

    try:
        return run(args)
    except (OSError, ValueError) as e:
        raise UserError(str(e)) from None


def demo_model(args) -> int:
    from worker.demo_model import write_demo_model

    out = write_demo_model(args.dir)
    print(f"demo model written to {out} (load with AutoModelForCausalLM.from_pretrained / AutoTokenizer)")
    return EXIT_OK
