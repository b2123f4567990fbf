"""deploy/: the cluster launcher config against Ray's own JSON schema, Kubernetes core kinds against
the Kubernetes schemas (kubernetes-validate, strict), Ray kinds by their required fields, and every
image, version and port against the one definition in cluster/release.py."""

from __future__ import annotations

import json
import re
import subprocess
from importlib.resources import files
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml

from cluster import release

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBE = sorted((DEPLOY / "kuberay").glob("*.yaml"))
CORE_KINDS = {"Secret", "Deployment", "Service", "ConfigMap"}


def docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_docs():
    return [(p.name, d) for p in KUBE for d in docs(p)]


def test_cluster_launcher_config_matches_rays_schema():
    config = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    schema = json.loads(files("ray.autoscaler").joinpath("ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert config["docker"]["image"] == release.RAY_GPU_IMAGE
    head = " ".join(config["head_start_ray_commands"])
    for flag in (
        f"--port={release.GCS_PORT}",
        f"--ray-client-server-port={release.CLIENT_PORT}",
        f"--dashboard-port={release.RAY_DASHBOARD_PORT}",
        "RAY_AUTH_MODE=token",
        "--num-gpus=0",
    ):
        assert flag in head
    assert f"--port {release.REDIS_PORT}" in head and "--requirepass" in head
    assert any("pip install" in c and "/home/ray/prefixcache" in c for c in config["setup_commands"])
    assert "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["max_workers"] >= gpu["min_workers"] >= 0


def test_launcher_schema_check_can_fail():
    schema = json.loads(files("ray.autoscaler").joinpath("ray-schema.json").read_text())
    broken = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    broken["available_node_types"]["gpu_worker"]["resources"] = {"GPU": -1}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


@pytest.mark.parametrize(
    "name,doc",
    [d for d in all_docs() if d[1]["kind"] in CORE_KINDS],
    ids=lambda x: x if isinstance(x, str) else x["kind"] + "/" + x["metadata"]["name"],
)
def test_core_kinds_validate_against_kubernetes_schemas(name, doc):
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_kubernetes_validation_can_fail():
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"ports": [{"port": "eighty"}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)


def ray_docs(kind):
    found = [d for _, d in all_docs() if d["kind"] == kind]
    assert found, f"no {kind} in deploy/kuberay"
    return found


def containers(spec):
    return spec["template"]["spec"]["containers"]


def test_raycluster_fields_images_and_ports():
    [rc] = ray_docs("RayCluster")
    assert rc["apiVersion"] == "ray.io/v1" and rc["metadata"]["name"]
    spec = rc["spec"]
    assert spec["rayVersion"] == release.RAY_VERSION == ray.__version__
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["rayStartParams"]["ray-client-server-port"] == str(release.CLIENT_PORT)
    ports = {p["containerPort"] for c in containers(head) for p in c.get("ports", [])}
    assert {release.GCS_PORT, release.RAY_DASHBOARD_PORT, release.CLIENT_PORT} <= ports
    [group] = spec["workerGroupSpecs"]
    assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    limits = containers(group)[0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    for c in containers(head) + containers(group):
        assert c["image"] == release.IMAGE
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
        assert f":{release.REDIS_PORT}/" in env["PREFIXCACHE_REDIS_URL"]["value"]


def test_rayjob_runs_start_and_a_batch_on_that_cluster():
    [job] = ray_docs("RayJob")
    [rc] = ray_docs("RayCluster")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]
    entry = job["spec"]["entrypoint"]
    assert "prefixcache start" in entry and "prefixcache submit" in entry and "--redis-url" in entry
    sample = re.search(r"submit (\S+)", entry).group(1).replace("/home/ray/prefixcache/", "")
    lines = (ROOT / sample).read_text().splitlines()
    assert lines and all(json.loads(x)["prompt"] for x in lines)
    assert all(c["image"] == release.IMAGE for c in job["spec"]["submitterPodTemplate"]["spec"]["containers"])
    from cluster.cli.main import build_parser  # the entrypoint parses with the real CLI

    for command in entry.split("&&"):
        argv = command.split()[1:]
        build_parser().parse_args([a.strip('"') for a in argv])


def test_the_disk_tier_directory_is_a_volume_of_the_worker_pods():
    """`start --disk-cache-dir` names a mounted volume of the GPU workers' pods (not their image's
    filesystem), and that pod template is a valid Kubernetes pod."""
    [job] = ray_docs("RayJob")
    [rc] = ray_docs("RayCluster")
    start = next(c for c in job["spec"]["entrypoint"].split("&&") if "prefixcache start" in c)
    from cluster.cli.main import build_parser

    args = build_parser().parse_args([a.strip('"') for a in start.split()[1:]])
    assert args.disk_cache_dir and args.disk_cache_gb > 0
    [group] = rc["spec"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
    assert mounts.get(args.disk_cache_dir) in {v["name"] for v in pod["volumes"]}
    doc = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "gpu-worker"}, "spec": pod}
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_services_and_images_agree_with_the_code():
    by_name = {(d["kind"], d["metadata"]["name"]): d for _, d in all_docs()}
    redis_svc = by_name[("Service", "prefixcache-redis")]
    assert redis_svc["spec"]["ports"][0]["port"] == release.REDIS_PORT
    dash_svc = by_name[("Service", "prefixcache-dashboard")]
    assert dash_svc["spec"]["ports"][0]["port"] == release.DASHBOARD_PORT
    dash = by_name[("Deployment", "prefixcache-dashboard")]
    [c] = containers(dash["spec"])
    assert c["image"] == release.IMAGE and c["command"][:2] == ["prefixcache", "dashboard"]
    assert str(release.DASHBOARD_PORT) in c["command"]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"FROM {release.RAY_GPU_IMAGE}" in dockerfile
    assert release.PREFIXCACHE_VERSION in dockerfile
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"ray[default,serve]=={release.RAY_VERSION}"' in pyproject  # serve: the HTTP API
    assert f'version = "{release.PREFIXCACHE_VERSION}"' in pyproject


def test_local_cluster_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(DEPLOY / "local-cluster.sh")], check=True)
