"""Headless Chromium (Debian's package) driven from its command line: DOM after scripts ran, screenshots."""

from __future__ import annotations

import shutil
import subprocess
import tempfile

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run(url: str, extra: list[str], budget_ms: int, width: int, height: int) -> str:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = [
            binary(),
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--virtual-time-budget={budget_ms}",
            *extra,
            url,
        ]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


def dom(url: str, *, budget_ms: int = 8000, width: int = 1280, height: int = 800) -> str:
    """The page's DOM once its scripts have run for `budget_ms` of virtual time."""
    return _run(url, ["--dump-dom"], budget_ms, width, height)


def screenshot(url: str, path: str, *, budget_ms: int = 8000, width: int = 1280, height: int = 800) -> None:
    _run(url, [f"--screenshot={path}"], budget_ms, width, height)
