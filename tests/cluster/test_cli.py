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


def test_every_attention_mode_is_a_choice_and_a_bad_one_says_which_are():
    from cache_store import ConfigError
    from worker.config import ATTENTION_MODES

    parser = build_parser()
    assert [parser.parse_args(["start", "--attention", m]).attention for m in ATTENTION_MODES] == list(ATTENTION_MODES)
    assert main(["start", "--attention", "flash"]) == 2
    assert ServiceSpec(attention="sdpa").engine_config().attention == "sdpa"
    with pytest.raises(ConfigError, match="attention must be one of"):
        ServiceSpec(attention="flash")


def test_every_linear_mode_is_a_choice_and_reaches_the_engine_config():
    from cache_store import ConfigError
    from worker.config import LINEAR_MODES

    parser = build_parser()
    assert [parser.parse_args(["start", "--linear", m]).linear for m in LINEAR_MODES] == list(LINEAR_MODES)
    assert main(["start", "--linear", "fast"]) == 2
    assert ServiceSpec(linear="plain").engine_config().linear == "plain"
    with pytest.raises(ConfigError, match="linear must be one of"):
        ServiceSpec(linear="fast")


def test_every_forward_mode_is_a_choice_and_reaches_the_engine_config():
    from cache_store import ConfigError
    from worker.config import FORWARD_MODES

    parser = build_parser()
    assert [parser.parse_args(["start", "--forward", m]).forward for m in FORWARD_MODES] == list(FORWARD_MODES)
    assert main(["start", "--forward", "fast"]) == 2
    assert ServiceSpec(forward="transformers").engine_config().forward == "transformers"
    with pytest.raises(ConfigError, match="forward must be one of"):
        ServiceSpec(forward="fast")


def test_every_cuda_graphs_mode_is_a_choice_and_reaches_the_engine_config():
    from cache_store import ConfigError
    from worker.config import CUDA_GRAPHS_MODES

    parser = build_parser()
    got = [parser.parse_args(["start", "--cuda-graphs", m]).cuda_graphs for m in CUDA_GRAPHS_MODES]
    assert got == list(CUDA_GRAPHS_MODES)
    assert main(["start", "--cuda-graphs", "on"]) == 2
    assert ServiceSpec(cuda_graphs="off").engine_config().cuda_graphs == "off"
    with pytest.raises(ConfigError, match="cuda_graphs must be one of"):
        ServiceSpec(cuda_graphs="on")


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
