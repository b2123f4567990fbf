"""vLLM's side of `python -m cluster.bench.peer_vllm`: run a plan on vLLM's `LLMEngine`.

Run by vLLM's own venv python as a script: `python peer_vllm_side.py PLAN.json OUT.json`. It needs
only vLLM and the standard library (the project is never imported here, nor vLLM there). vLLM
starts its engine core in a spawned process, which imports this file again: everything runs
under `if __name__ == "__main__"`.

Requests go in through `LLMEngine.add_request` with prompt token ids and come back through
`step()`, stamped when `step()` returns them (what a caller of vLLM sees), so the closed loop of
`peer_driver.drive` keeps exactly `concurrency` requests in flight.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _driver():
    """`peer_driver` by file path. This file's directory (sys.path[0] for a script) holds the
    project's bench modules (`report`, `suite`, ...): drop it so none shadows a module vLLM imports."""
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    spec = importlib.util.spec_from_file_location("peer_driver", HERE / "peer_driver.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["peer_driver"] = mod  # its dataclasses look their module up while being made
    spec.loader.exec_module(mod)
    return mod


class VllmBackend:
    def __init__(self, driver, plan: dict):
        from vllm import LLM

        self.d = driver
        self.llm = LLM(
            model=plan["model_dir"],
            dtype="float32",
            enable_prefix_caching=True,
            max_model_len=plan["max_model_len"],
            seed=0,
        )
        self.engine = self.llm.llm_engine

    def reset(self) -> None:
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused reset_prefix_cache (requests still running?)")

    def submit(self, rid: int, ids: list[int], max_tokens: int) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            temperature=0.0,
            max_tokens=max_tokens,
            min_tokens=max_tokens,
            ignore_eos=True,
            output_kind=RequestOutputKind.DELTA,
        )
        # RequestOutput.request_id is this external id (vLLM adds a random suffix internally only)
        self.engine.add_request(str(rid), {"prompt_token_ids": list(ids)}, params)

    def events(self) -> list:
        outs = self.engine.step()
        t = self.d.clock()
        evs = []
        for out in outs:
            tokens = list(out.outputs[0].token_ids)
            cached = out.num_cached_tokens or 0
            evs.append(self.d.Event(int(out.request_id), tokens, t, finished=out.finished, cached=cached))
        return evs


def main(plan_path: str, out_path: str) -> None:
    driver = _driver()
    plan = driver.load(plan_path)
    import vllm

    t0 = time.time()
    backend = VllmBackend(driver, plan)
    ready = time.time()
    print(f"vLLM {vllm.__version__} ready in {ready - t0:.1f} s; running the plan", flush=True)
    try:
        phases = driver.run_plan(backend, plan, log=lambda m: print(m, flush=True))
    finally:
        backend.engine.engine_core.shutdown()  # stops the engine-core process it spawned
    config = backend.engine.vllm_config
    info = {
        "engine": f"vLLM {vllm.__version__} (LLMEngine, CPU)",
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "omp_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", ""),
        "kv_cache_gb": os.environ.get("VLLM_CPU_KVCACHE_SPACE", ""),
        "block_size": config.cache_config.block_size,
        "max_num_seqs": config.scheduler_config.max_num_seqs,
        "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
    }
    driver.save(out_path, {"info": info, "engine_s": ready - t0, "ready_wall": ready, "phases": phases})


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: peer_vllm_side.py PLAN.json OUT.json")
    main(sys.argv[1], sys.argv[2])
    # the engine core is shut down and the results saved: do not wait on vLLM's leftover threads
    sys.stdout.flush()
    os._exit(0)
