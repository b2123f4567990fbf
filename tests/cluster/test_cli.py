"""The CLI's choices and defaults are read from their homes, not restated (no Ray needed)."""

import pytest

from cache_store.policy import POLICIES as EVICTION_POLICIES
from cluster.cli import build_parser, main
from cluster.policies import POLICIES as ROUTING_POLICIES
from cluster.service import ServiceSpec


def test_start_defaults_are_the_service_defaults():
    args, spec = build_parser().parse_args(["start"]), ServiceSpec()
    for name in (
        "service",
        "routers",
        "device_cache_gb",
        "host_cache_gb",
        "block_size",
        "eviction",
        "policy",
        "max_running",
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


def test_every_registered_routing_policy_is_a_choice():
    parser = build_parser()
    assert [parser.parse_args(["start", "--policy", p]).policy for p in ROUTING_POLICIES] == list(ROUTING_POLICIES)
    assert main(["start", "--policy", "random"]) == 2


def test_bench_peer_is_its_own_run(capsys):
    assert build_parser().parse_args(["bench", "--peer", "vllm", "--quick"]).peer == "vllm"
    assert main(["bench", "--peer", "sglang"]) == 2  # not a choice
    assert main(["bench", "--peer", "vllm", "--only", "service"]) == 2
    assert "--only picks a part of the suite" in capsys.readouterr().err
