"""Every bad input gets a clear error for that request (or that command) only; the service keeps serving.
Table-driven, through the public face: Cluster.generate, the CLI and Cluster.start."""

from __future__ import annotations

import json

import pytest
import ray

from cache_store import EmbeddedRedis
from cluster import Cluster
from cluster.cli.main import main as cli
from cluster.service.spec import ServiceError


@pytest.fixture(scope="module")
def cluster(ray_local):
    c = Cluster.start(workers=1, service="t-bad", device_cache_gb=0.02, host_cache_gb=0)
    yield c
    c.shutdown()


REQUESTS = [
    ("empty prompt", {"prompt": ""}, "empty or whitespace"),
    ("whitespace only", {"prompt": " \n\t "}, "empty or whitespace"),
    ("non-string prompt", {"prompt": {"text": "hi"}}, "must be a string or a list of token ids"),
    ("number prompt", {"prompt": 7}, "must be a string or a list of token ids"),
    ("prompt over the context", {"prompt": "y" * 8300}, "exceeds the model context of 8192"),
    ("token ids out of vocabulary", {"prompt": [3, 259]}, "outside the vocabulary [0, 259)"),
    ("negative token id", {"prompt": [-4, 3]}, "outside the vocabulary"),
    ("negative max_new_tokens", {"prompt": "ok", "max_new_tokens": -1}, "max_new_tokens must be an integer >= 0"),
    ("huge max_new_tokens", {"prompt": "ok", "max_new_tokens": 10**9}, "exceeds the model context"),
    ("temperature below zero", {"prompt": "ok", "temperature": -0.5}, "temperature must be a number >= 0"),
    ("top_p out of range", {"prompt": "ok", "top_p": 1.5}, "top_p must be in (0, 1]"),
    ("empty salt", {"prompt": "ok", "cache_salt": ""}, "cache_salt must be null or a non-empty string"),
    ("unknown field", {"prompt": "ok", "temprature": 0}, "unknown field(s) ['temprature']"),
    ("no prompt", {"max_new_tokens": 3}, 'missing "prompt"'),
]


@pytest.mark.parametrize("name,request_dict,message", REQUESTS, ids=[r[0] for r in REQUESTS])
def test_bad_request(cluster, name, request_dict, message):
    out = ray.get(cluster._router.generate.remote(request_dict))
    assert out["finish_reason"] == "error" and message in out["error"], out["error"]
    [ok] = cluster.generate(["the service still serves"], max_new_tokens=1)
    assert ok.ok


def test_bad_requests_in_one_batch_fail_alone(cluster):
    results = cluster.generate(["fine one", "", "fine two", [1, 999]], max_new_tokens=2)
    assert [r.ok for r in results] == [True, False, True, False]


LINES = [
    ("malformed JSON", "{prompt: nope", "invalid JSON"),
    ("not an object", "[1, 2]", "expected a JSON object"),
    ("oversized line", json.dumps({"prompt": "z" * (5 << 20)}), "longer than 4194304 bytes"),
    ("bad value", json.dumps({"prompt": "ok", "temperature": -1}), "temperature must be"),
]


@pytest.mark.parametrize("name,line,message", LINES, ids=[x[0] for x in LINES])
def test_bad_jsonl_line(cluster, tmp_path, name, line, message):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "good line", "max_new_tokens": 1}) + "\n" + line + "\n")
    out = tmp_path / "out.jsonl"
    assert cli(["submit", str(src), "--service", "t-bad", "--out", str(out), "--no-progress"]) == 1
    good, bad = [json.loads(x) for x in out.read_text().splitlines()]
    assert good["error"] is None and bad["line"] == 2 and message in bad["error"]


CLI = [
    ("unknown flag", ["submit", "x.jsonl", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    ("unknown command", ["serve"], "invalid choice: 'serve'"),
    ("missing file", ["submit", "/no/such/file.jsonl"], "no such file"),
    ("dashboard without a URL", ["dashboard", "--redis-url", ""], "--redis-url"),
]


@pytest.mark.parametrize("name,argv,message", CLI, ids=[x[0] for x in CLI])
def test_bad_cli_usage(name, argv, message, capsys):
    assert cli(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_service_settings(ray_local, tmp_path):
    with pytest.raises(ServiceError, match="unknown model .* local Hugging Face model directory"):
        Cluster.start(workers=1, model=str(tmp_path / "missing-model"), service="t-bad-model")
    with pytest.raises(ServiceError, match="unreachable.*--redis-url"):
        Cluster.start(workers=1, redis_url="redis://127.0.0.1:1/0", service="t-bad-url")
    with EmbeddedRedis() as server:
        wrong = server.url.replace(server.password, "not-the-password")
        with pytest.raises(ServiceError, match="refused the credentials"):
            Cluster.start(workers=1, redis_url=wrong, service="t-bad-pass")
    with pytest.raises(ValueError, match="policy must be one of"):
        Cluster.start(workers=1, policy="fastest", service="t-bad-policy")
    # nothing of the failed starts is left behind
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert not {n for n in names if n.startswith("t-bad-")}
