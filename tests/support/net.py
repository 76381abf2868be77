"""Local networking helpers: free ports and waiting for HTTP servers (127.0.0.1 only)."""

from __future__ import annotations

import socket
import subprocess
import time

import httpx

__all__ = ["LOCALHOST", "ServerDiedError", "free_port", "wait_for_http"]

LOCALHOST = "127.0.0.1"


class ServerDiedError(RuntimeError):
    """The process that should serve the URL exited before it answered."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, then close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_http(
    url: str,
    timeout: float = 15.0,
    *,
    process: subprocess.Popen[bytes] | None = None,
    interval: float = 0.05,
) -> httpx.Response:
    """Poll ``url`` with GET until the server answers with any HTTP status; return that response.

    Any status counts as "up" (a 401 from an auth front is an answer). Raises ``TimeoutError``
    after ``timeout`` seconds, or ``ServerDiedError`` as soon as ``process`` (if given) has exited.
    Only loopback URLs are accepted, so a typo can never send traffic off the machine.
    """
    host = httpx.URL(url).host
    if host not in (LOCALHOST, "localhost", "::1"):
        raise ValueError(f"wait_for_http only polls loopback URLs, not {url!r}")
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while True:
            if process is not None and process.poll() is not None:
                raise ServerDiedError(
                    f"process {process.pid} exited with {process.returncode} before {url} answered"
                )
            try:
                return client.get(url)
            except httpx.TransportError as exc:
                last_error = exc
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{url} did not answer within {timeout}s: {last_error!r}")
            time.sleep(interval)
