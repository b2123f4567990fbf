"""One worker per GPU: a Ray node declaring 2 GPUs on this CPU machine (Ray's own Cluster test helper).
Ray gives each worker its own GPU id and sets CUDA_VISIBLE_DEVICES; torch sees no CUDA here, so the
engine falls back to CPU and still serves. Runs in a subprocess: this test process may hold another Ray."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import json, ray
from ray.cluster_utils import Cluster
from cluster.service.launch import start_service, stop_service
from cluster.service.spec import ServiceSpec
from worker.request import Request

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
gpu_node = cluster.add_node(num_cpus=2, num_gpus=2)
ray.init(address=cluster.address, log_to_driver=False)
try:
    started = start_service(ServiceSpec(service="gpu-test", workers=2, device_cache_gb=0.02, host_cache_gb=0))
    health = ray.get([h.health.remote() for h in started.workers.values()])
    out = ray.get(started.router.generate.remote(Request("placed on a GPU node", max_new_tokens=2).to_dict()))
    print(json.dumps({"health": health, "gpu_node": gpu_node.node_id, "result_error": out["error"]}))
    stop_service("gpu-test")
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_one_worker_per_gpu_each_with_its_own_gpu_id():
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    health = got["health"]
    assert len(health) == 2
    assert sorted(h["gpu_ids"][0] for h in health) == ["0", "1"]  # each its own GPU
    assert all(len(h["gpu_ids"]) == 1 for h in health)
    assert all(h["node_id"] == got["gpu_node"] for h in health)  # the head (no GPU) got none
    assert all(h["cuda_visible_devices"] == h["gpu_ids"][0] for h in health)  # set by Ray, per worker
    assert all(h["device"] == "cpu" for h in health)  # no CUDA on this machine: CPU fallback
    assert got["result_error"] is None
