"""Health check of the PAD image (HEALTHCHECK, compose).

    pad-healthcheck           the gateway: GET /health answers 200 (PAD_PORT)
    pad-healthcheck worker    a standalone worker: its ZeroMQ port accepts
                              connections (bound once the model is loaded;
                              PAD_WORKER_BIND)

/health needs no API key. Exit 0 when healthy."""

import os
import socket
import sys
import urllib.request


def gateway() -> int:
    url = f"http://127.0.0.1:{os.environ.get('PAD_PORT', '8000')}/health"
    with urllib.request.urlopen(url, timeout=4) as response:  # noqa: S310 (fixed local URL)
        return 0 if response.status == 200 else 1


def worker() -> int:
    bind = os.environ.get("PAD_WORKER_BIND", "tcp://0.0.0.0:5557")
    port = int(bind.rsplit(":", 1)[1])
    socket.create_connection(("127.0.0.1", port), timeout=4).close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(worker() if sys.argv[1:] == ["worker"] else gateway())
    except (OSError, ValueError, IndexError) as exc:  # URLError, HTTPError (503 while loading), timeouts
        print(f"unhealthy: {exc}", file=sys.stderr)
        sys.exit(1)
