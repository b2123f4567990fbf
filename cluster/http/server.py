"""Starting and stopping the HTTP API (a Ray Serve application) for one prefixcache service.

Ray Serve runs one HTTP proxy per cluster, so one service per Ray cluster has the HTTP API. Without
API keys the proxy binds 127.0.0.1 only: an open port would let anyone on the network run the model
and, worse, probe other users' cached prompts by timing. `stop_http` deletes the application and shuts
Serve down when nothing else runs on it, so the port is free again.
"""

from __future__ import annotations

import logging
import socket

import ray

from cluster.http.cors import parse_origins
from cluster.http.keys import KeyFileError, load_keys
from cluster.service.spec import ServiceError

log = logging.getLogger(__name__)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def app_name(service: str) -> str:
    return f"prefixcache-{service}"


def default_host(keyed: bool) -> str:
    return "0.0.0.0" if keyed else "127.0.0.1"


def binding_note(host: str | None, keyed: bool) -> str:
    """The line `start` / `demo` print about who can reach the API."""
    host = host or default_host(keyed)
    if keyed:
        return f"HTTP API on {host}: every request needs 'Authorization: Bearer KEY' from the --api-keys file"
    return "HTTP API without --api-keys: bound to 127.0.0.1 only (pass --api-keys FILE to serve other machines)"


def start_http(
    service: str,
    port: int,
    *,
    host: str | None = None,
    api_keys: str | None = None,
    allowed_origins: str | None = None,
    replicas: int = 1,
) -> str:
    """Deploy the ingress for `service` and return its base URL (http://HOST:PORT). `allowed_origins`
    is --allowed-origins' text (cluster.http.cors.parse_origins); None leaves CORS off."""
    from ray import serve

    from cluster.http.app import Ingress

    try:
        keys = load_keys(api_keys) if api_keys else None
        origins = parse_origins(allowed_origins) if allowed_origins is not None else ()
    except (KeyFileError, ValueError) as e:
        raise ServiceError(str(e)) from None
    host = host or default_host(keys is not None)
    if keys is None and host not in LOCAL_HOSTS:
        raise ServiceError(f"--http-host {host} without --api-keys would open the API to the network; pass --api-keys")
    if _serve_running():
        raise ServiceError(
            "Ray Serve already runs on this Ray cluster (another service's HTTP API?); one HTTP API per cluster: "
            "stop it first, or start this service without --http-port"
        )
    _check_port_free(host, port)
    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
    try:
        serve.run(
            Ingress.options(num_replicas=replicas).bind(service, keys, origins),
            name=app_name(service),
            route_prefix="/",
            blocking=False,
        )
    except BaseException:
        serve.shutdown()
        raise
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}"


def stop_http(service: str) -> bool:
    """Delete the service's HTTP application (in-flight requests finish first); True if there was one."""
    if not _serve_running():
        return False
    from ray import serve

    apps = serve.status().applications
    found = app_name(service) in apps
    if found:
        serve.delete(app_name(service))
    if not set(apps) - {app_name(service)}:
        serve.shutdown()
    return found


def _serve_running() -> bool:
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    if not ray.is_initialized():
        return False
    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
        except OSError as e:
            raise ServiceError(f"cannot serve HTTP on {host}:{port}: {e.strerror}; pick another --http-port") from None
