"""Our side of `python -m cluster.bench.peer_vllm`: run a plan on `worker.engine.Engine`, in process.

Run as `python -m cluster.bench.peer_ours PLAN.json OUT.json` in a fresh process (started by
`peer_vllm`), so nothing else in it has touched torch: the engine is built, and steps, on its own
thread (`Engine.on_own_thread`, as a worker actor runs it), with the plan's thread count; the
main thread only sends requests and collects tokens. Each token is stamped by the engine's thread
as the engine hands it out (the request's sink), the counterpart of vLLM's `step()` returning it.
"""

from __future__ import annotations

import queue
import sys
import time
from collections.abc import Callable

from cluster.bench import peer_driver as d
from worker.engine import Engine

MODEL = "smollm2"  # worker.models resolves it to worker.smollm2.model_dir(), the directory vLLM is given


class EngineBackend:
    """A `peer_driver.Backend` over an `Engine` that `build()` makes on the engine's own thread."""

    def __init__(self, build: Callable[[], Engine]):
        self.engine = Engine.on_own_thread(build, name="bench-engine")
        self.inbox: queue.Queue[d.Event] = queue.Queue()

    def reset(self) -> None:
        self.engine.reset_prefix_cache()

    def submit(self, rid: int, ids: list[int], max_tokens: int) -> None:
        from worker.request import Request, Result

        def sink(chunk) -> None:  # on the engine's thread
            r, t = chunk.result, d.clock()
            if r is None:
                self.inbox.put(d.Event(rid, list(chunk.token_ids), t))
            else:
                self.inbox.put(d.Event(rid, list(chunk.token_ids), t, True, r.cached_tokens, r.error))

        req = Request(list(ids), max_new_tokens=max_tokens, ignore_eos=True, min_tokens=max_tokens, id=str(rid))
        seq = self.engine.submit(req, sink=sink)
        if isinstance(seq, Result):  # refused before it ran
            raise RuntimeError(f"our engine refused request {rid}: {seq.error}")

    def events(self) -> list[d.Event]:
        evs = [self.inbox.get()]
        while not self.inbox.empty():
            evs.append(self.inbox.get_nowait())
        return evs

    def info(self) -> dict:
        """What the engine says it runs (`Engine.info()`: batching limits, block size, and whatever
        else it names, such as its attention path)."""
        return {"engine": "prefixcache Engine (in process)", **self.engine.info()}


class OursBackend(EngineBackend):
    def __init__(self, plan: dict):
        def build() -> Engine:
            import torch

            torch.set_num_threads(plan["threads"])  # on the engine's thread, before its first op
            return Engine.from_pretrained(
                MODEL,
                device="cpu",
                dtype="float32",
                device_cache_gb=plan["kv_cache_gb"],
                host_cache_gb=0,
                max_running=plan["ours"]["max_running"],
                max_batch_tokens=plan["ours"]["max_batch_tokens"],
            )

        super().__init__(build)


def main(plan_path: str, out_path: str) -> None:
    plan = d.load(plan_path)
    t0 = time.time()
    backend = OursBackend(plan)
    ready = time.time()
    print(f"our engine ready in {ready - t0:.1f} s; running the plan", flush=True)
    info = backend.info()
    try:
        phases = d.run_plan(backend, plan, log=lambda m: print(m, flush=True))
    finally:
        backend.engine.close()
    d.save(out_path, {"info": info, "engine_s": ready - t0, "ready_wall": ready, "phases": phases})


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m cluster.bench.peer_ours PLAN.json OUT.json")
    main(sys.argv[1], sys.argv[2])
