"""The HTTP API with --api-keys: 401s, tenants that never share a block, keys-file errors, and a 503
once no worker is alive (demo model: these tests are about the service, not the answers)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest
import ray

from cache_store.embedded import free_port
from cluster import Cluster
from cluster.http.keys import KeyFileError, load_keys
from cluster.service.spec import ServiceError
from tests.cluster.helpers import http_get, http_get_json
from worker.actor import NAMESPACE, worker_actor_name

KEYS = {"acme": "sk-acme-0123456789abcdef", "globex": "sk-globex-0123456789abcdef"}
SYSTEM = "Tenant isolation over HTTP: the same system prompt for two tenants. " * 4


@pytest.fixture(scope="module")
def keyed(ray_local, tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text("# key tenant\n" + "".join(f"{k}  {t}\n" for t, k in KEYS.items()))
    c = Cluster.start(
        workers=1,
        service="t-keys",
        device_cache_gb=0.05,
        host_cache_gb=0.05,
        http_port=free_port(),
        http_host="127.0.0.1",
        api_keys=str(path),
    )
    yield c
    c.shutdown()


def client_for(c, tenant):
    return openai.OpenAI(base_url=c.http_url + "/v1", api_key=KEYS[tenant], max_retries=0, timeout=60)


def ask(client, **kw):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "q"}]
    return client.chat.completions.create(model="demo", messages=messages, max_tokens=3, temperature=0, **kw)


def test_missing_or_wrong_keys_are_401s(keyed):
    status, body = http_get_json(keyed.http_url + "/v1/models")
    assert status == 401 and "didn't provide an API key" in body["error"]["message"]
    assert body["error"]["code"] == "invalid_api_key"
    status, body = http_get_json(keyed.http_url + "/v1/models", token="sk-not-a-key-of-this-server")
    assert status == 401 and "Incorrect API key" in body["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        ask(openai.OpenAI(base_url=keyed.http_url + "/v1", api_key="sk-wrong-wrong-wrong", max_retries=0))
    status, _ = http_get_json(keyed.http_url + "/health")  # load balancers probe without a key
    assert status == 200
    assert http_get_json(keyed.http_url + "/v1/models", token=KEYS["acme"])[0] == 200


def test_two_keys_tenants_never_share_a_block(keyed):
    acme, globex = client_for(keyed, "acme"), client_for(keyed, "globex")
    a1, b1, a2, b2 = ask(acme), ask(globex), ask(acme), ask(globex)
    cached = [r.usage.prompt_tokens_details.cached_tokens for r in (a1, b1, a2, b2)]
    assert cached[0] == 0 and cached[1] == 0  # globex did not hit what acme computed
    assert cached[2] > 0 and cached[3] > 0  # each hits its own
    assert len({r.choices[0].message.content for r in (a1, b1, a2, b2)}) == 1  # isolation changes no output


def test_a_keyed_tenant_cannot_choose_its_salt(keyed):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client_for(keyed, "acme"), extra_body={"cache_salt": "tenant:guess"})
    assert "either a tenant" in e.value.message


def keyed_post(c, path: str, body: dict, key: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(c.http_url + path, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_reset_metrics_and_tokenize_need_a_key(keyed):
    for path, body in (("/reset_prefix_cache", {}), ("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
        status, err = keyed_post(keyed, path, body, None)
        assert status == 401 and err["error"]["code"] == "invalid_api_key", path
        assert keyed_post(keyed, path, body, "sk-not-a-key-of-this-server")[0] == 401
    assert http_get(keyed.http_url + "/metrics")[0] == 401
    ask(client_for(keyed, "globex"))  # something to drop
    status, out = keyed_post(keyed, "/reset_prefix_cache", {}, KEYS["acme"])
    assert status == 200 and out["blocks_dropped"] > 0 and list(out["workers"]) == ["worker-0"]
    assert ask(client_for(keyed, "globex")).usage.prompt_tokens_details.cached_tokens == 0  # every tenant's
    status, text = http_get(keyed.http_url + "/metrics", token=KEYS["acme"])
    assert status == 200 and "prefixcache_http_requests_total" in text
    assert http_get_json(keyed.http_url + "/version")[0] == 200  # like /health: no key needed


@pytest.mark.parametrize(
    "text, words",
    [
        ("short acme\n", "use at least 16"),
        ("sk-0123456789abcdef\n", "expected 'KEY TENANT'"),
        ("# nothing\n", "no keys"),
        ("sk-0123456789abcdef a\nsk-0123456789abcdef b\n", "same key appears twice"),
    ],
)
def test_bad_keys_files_are_refused_with_the_line(tmp_path, text, words):
    path = tmp_path / "keys.txt"
    path.write_text(text)
    with pytest.raises(KeyFileError, match=words):
        load_keys(path)


def test_an_open_bind_without_keys_is_refused(ray_local):
    from cluster.http.server import start_http

    with pytest.raises(ServiceError, match="without --api-keys would open the API"):
        start_http("t-none", free_port(), host="0.0.0.0")


def test_a_worker_dying_mid_stream_ends_the_stream_with_an_error_then_503s(keyed):  # last: kills the only worker
    acme = client_for(keyed, "acme")
    messages = [{"role": "user", "content": "a long answer please"}]
    stream = acme.chat.completions.create(model="demo", messages=messages, max_tokens=3000, stream=True)
    chunks = iter(stream)
    next(chunks), next(chunks)  # text is flowing: the status line (200) has been sent
    ray.kill(ray.get_actor(worker_actor_name("t-keys", "worker-0"), namespace=NAMESPACE), no_restart=True)
    with pytest.raises(openai.APIError) as e:  # the client raises on the error event inside the stream
        for _ in chunks:
            pass
    assert "died after streaming" in str(e.value) and "resend the request" in str(e.value)
    with pytest.raises(openai.InternalServerError) as e:
        ask(acme)
    assert e.value.status_code == 503 and "no live worker" in e.value.message
    status, body = http_get_json(keyed.http_url + "/health")
    assert status == 503 and body["error"]["type"] == "service_unavailable"
