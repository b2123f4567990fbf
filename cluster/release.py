"""The versions and ports the files in deploy/ must agree with (tests/deploy checks every file).

One version string each: prefixcache's comes from the installed package metadata (pyproject),
Ray's is pinned here and in pyproject, and every image tag in deploy/ is derived from them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    PREFIXCACHE_VERSION = version("prefixcache")
except PackageNotFoundError:  # running from a source tree that was never installed
    PREFIXCACHE_VERSION = "0.0.0"

RAY_VERSION = "2.60.0"
PYTHON_TAG = "py311"
RAY_GPU_IMAGE = f"rayproject/ray:{RAY_VERSION}-{PYTHON_TAG}-gpu"  # base of deploy/Dockerfile
IMAGE = f"prefixcache:{PREFIXCACHE_VERSION}"  # built from deploy/Dockerfile; push it to your registry

GCS_PORT = 6379  # Ray head (GCS)
CLIENT_PORT = 10001  # Ray client: ray://HOST:10001
RAY_DASHBOARD_PORT = 8265  # Ray dashboard and Jobs API
REDIS_PORT = 6380  # the index (not 6379: that is the GCS on a head that also runs Redis)
DASHBOARD_PORT = 8080  # prefixcache dashboard
HTTP_PORT = 8000  # the OpenAI-compatible API (Ray Serve's HTTP proxy)
