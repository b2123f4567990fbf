"""API keys: `--api-keys FILE` maps each key to a tenant; the tenant becomes the request's cache salt.

File format, one key per line, `#` comments and blank lines ignored:

    sk-acme-4f9c0e...   acme
    sk-globex-77ab1...  globex

The router derives the salt as HMAC(service secret, tenant), so two tenants never share a block,
and a key's holder cannot pick a salt. The ingress keeps only SHA-256 digests of the keys (they travel
through Ray's deployment config), and compares digests.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cluster.http.errors import unauthorized
from worker.request import MAX_TENANT_CHARS

MIN_KEY_CHARS = 16


class KeyFileError(ValueError):
    """The keys file is unreadable or malformed; the message names the line."""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_keys(path: str | Path) -> dict[str, str]:
    """{sha256(key): tenant} from a keys file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"cannot read the API keys file {path}: {e}") from None
    table: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise KeyFileError(f"{path}:{n}: expected 'KEY TENANT' (two fields), got {len(parts)}")
        key, tenant = parts
        if len(key) < MIN_KEY_CHARS:
            raise KeyFileError(f"{path}:{n}: key is {len(key)} characters; use at least {MIN_KEY_CHARS}")
        if len(tenant) > MAX_TENANT_CHARS:
            raise KeyFileError(f"{path}:{n}: tenant is longer than {MAX_TENANT_CHARS} characters")
        if digest(key) in table:
            raise KeyFileError(f"{path}:{n}: the same key appears twice")
        table[digest(key)] = tenant
    if not table:
        raise KeyFileError(f"{path}: no keys in the file; one 'KEY TENANT' per line")
    return table


def tenant_for(table: dict[str, str] | None, authorization: str | None) -> str | None:
    """The caller's tenant (None when the service runs without keys), or a 401."""
    if table is None:
        return None
    if not authorization:
        raise unauthorized(
            "You didn't provide an API key. Send it as 'Authorization: Bearer KEY' (the openai client: api_key=KEY)"
        )
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise unauthorized("The Authorization header must be 'Bearer KEY'")
    tenant = table.get(digest(key.strip()))
    if tenant is None:
        raise unauthorized("Incorrect API key provided. Use a key from the server's --api-keys file")
    return tenant
