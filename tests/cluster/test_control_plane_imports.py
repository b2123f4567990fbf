"""The control plane (HTTP ingress, router service, client, launcher, CLI) imports neither torch nor
transformers: every ingress and router replica would otherwise load the engine's libraries. They
load a tokenizer (transformers) when a replica starts, never on import."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONTROL_PLANE = (
    "cluster.http.app",
    "cluster.http.server",
    "cluster.service.spec",
    "cluster.service.lookup",
    "cluster.service.router_actor",
    "cluster.routing.router",
    "cluster.service.client",
    "cluster.service.launch",
    "cluster.cli.main",
    "worker.names",
    "worker.request",
)
PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in ("torch", "transformers", "worker.engine", "worker.models") if m in sys.modules)))
"""


def test_importing_the_control_plane_loads_neither_torch_nor_transformers():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *CONTROL_PLANE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []
