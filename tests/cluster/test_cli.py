"""The CLI's choices and defaults are read from their homes, not restated (no Ray needed)."""

import pytest

from cache_store.policy import POLICIES as EVICTION_POLICIES
from cluster.cli.main import build_parser, main
from cluster.routing.policies import POLICIES as ROUTING_POLICIES
from cluster.service.spec import ServiceSpec


def test_start_defaults_are_the_service_defaults():
    args, spec = build_parser().parse_args(["start"]), ServiceSpec()
    for name in (
        "service",
        "routers",
        "device_cache_gb",
        "host_cache_gb",
        "disk_cache_dir",
        "disk_cache_gb",
        "block_size",
        "eviction",
        "policy",
        "max_running",
        "max_batch_tokens",
        "attention",
        "linear",
        "forward",
        "cuda_graphs",
        "workers",
        "model",
        "cpus_per_worker",
        "audit_fraction",
    ):
        assert getattr(args, name) == getattr(spec, name), name


@pytest.mark.parametrize(
    "command", [["start"], ["simulate", "--trace", "t", "--workers", "1", "--capacity-blocks", "1"]]
)
def test_every_registered_eviction_policy_is_a_choice(command):
    parser = build_parser()
    assert [parser.parse_args([*command, "--eviction", e]).eviction for e in EVICTION_POLICIES] == list(
        EVICTION_POLICIES
    )
    assert main([*command, "--eviction", "fifo"]) == 2


@pytest.mark.parametrize(
    ("field", "modes", "kept", "bad"),
    [
        ("attention", "ATTENTION_MODES", "sdpa", "flash"),
        ("linear", "LINEAR_MODES", "plain", "fast"),
        ("forward", "FORWARD_MODES", "transformers", "fast"),
        ("cuda_graphs", "CUDA_GRAPHS_MODES", "off", "on"),
    ],
)
def test_every_engine_mode_is_a_choice_reaches_the_engine_config_and_a_bad_one_says_which_are(field, modes, kept, bad):
    """--attention, --linear, --forward, --cuda-graphs: their choices are worker.config's, a chosen
    one reaches EngineConfig, and a bad one is refused on the command line and by ServiceSpec."""
    from cache_store import ConfigError
    from worker import config

    flag = "--" + field.replace("_", "-")
    choices = getattr(config, modes)
    parser = build_parser()
    assert [getattr(parser.parse_args(["start", flag, m]), field) for m in choices] == list(choices)
    assert main(["start", flag, bad]) == 2
    assert getattr(ServiceSpec(**{field: kept}).engine_config(), field) == kept
    with pytest.raises(ConfigError, match=f"{field} must be one of"):
        ServiceSpec(**{field: bad})


def test_every_registered_routing_policy_is_a_choice():
    parser = build_parser()
    assert [parser.parse_args(["start", "--policy", p]).policy for p in ROUTING_POLICIES] == list(ROUTING_POLICIES)
    assert main(["start", "--policy", "random"]) == 2


def test_demo_keeps_its_disk_tier_under_the_users_cache_directory(tmp_path, monkeypatch):
    from cache_store import default_disk_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    args = build_parser().parse_args(["demo"])
    assert args.disk_cache_dir == str(default_disk_dir()) and args.disk_cache_dir.startswith(str(tmp_path))
    assert args.disk_cache_gb > 0 and not args.no_disk_cache


def test_each_worker_gets_its_own_disk_directory_and_bad_disk_settings_say_what_to_change(tmp_path):
    spec = ServiceSpec(service="s1", disk_cache_dir=str(tmp_path), disk_cache_gb=2)
    dirs = {spec.cache_config(w).disk_dir for w in ("worker-0", "worker-1")}
    assert dirs == {str(tmp_path / "s1" / "worker-0"), str(tmp_path / "s1" / "worker-1")}
    assert spec.cache_config("worker-0").disk_bytes == 2 << 30 and spec.cache_config().disk_dir is None
    assert ServiceSpec().cache_config("worker-0").disk_dir is None  # off unless a directory is given
    with pytest.raises(ValueError, match="absolute"):
        ServiceSpec(disk_cache_dir="kv")
    with pytest.raises(ValueError, match="disk_cache_gb must be > 0"):
        ServiceSpec(disk_cache_dir=str(tmp_path), disk_cache_gb=0)
    with pytest.raises(ValueError, match="host-cache-gb"):
        ServiceSpec(disk_cache_dir=str(tmp_path), host_cache_gb=0)


def test_bench_peer_is_its_own_run(capsys):
    assert build_parser().parse_args(["bench", "--peer", "vllm", "--quick"]).peer == "vllm"
    assert main(["bench", "--peer", "sglang"]) == 2  # not a choice
    assert main(["bench", "--peer", "vllm", "--only", "service"]) == 2
    assert "--only picks a part of the suite" in capsys.readouterr().err
