"""A `pad serve` subprocess on a free local port, for `pad eval` / `pad bench`
runs without --base-url. Started, health-checked, stopped on exit."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence

import httpx

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(root_url: str, process: subprocess.Popen | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"`pad serve` exited with code {process.returncode} before it was ready")
        try:
            if httpx.get(f"{root_url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"`pad serve` not healthy at {root_url} after {timeout:.0f} s")


@contextlib.contextmanager
def local_server(extra_args: Sequence[str] = (), timeout: float = 300.0) -> Iterator[str]:
    """Yields the /v1 base URL of a fresh `pad serve` (embedded model unless
    extra_args or PAD_* variables say otherwise)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="pad-tool-server-") as data_dir:
        # A throw-away data dir: measurement traffic stays out of the user's database.
        command = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                   "--log-level", "warning", "--data-dir", data_dir, *extra_args]
        logger.info("starting %s", " ".join(command))
        process = subprocess.Popen(command, env=dict(os.environ))
        root = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(root, process, timeout)
            yield f"{root}/v1"
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
