"""Helpers for the gateway tests on the tiny engine: a worker in a thread
(the real Worker loop behind a real ZeroMQ socket) and a real uvicorn server
in a thread (real TCP, so clients can hang up)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import zmq

from pad_core.testing import tiny_engine
from pad_core.worker import Worker


@contextlib.contextmanager
def worker_thread(address: str | None = None, engine=None, step_delay: float = 0.0) -> Iterator[tuple[str, Worker]]:
    """A Worker serving `engine` (a fresh tiny one by default) on `address`;
    `step_delay` seconds are added to every step (a slow model)."""
    engine = engine or tiny_engine()
    if step_delay:
        step = engine.step

        def slow_step():
            time.sleep(step_delay)
            return step()

        engine.step = slow_step
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    if address is None:  # a port the OS picks as it binds (a probed free port could be taken before the bind)
        sock.bind("tcp://127.0.0.1:*")
        address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    else:
        sock.bind(address)
    worker = Worker(engine, sock)
    thread = threading.Thread(target=worker.serve_forever, daemon=True)
    thread.start()
    try:
        yield address, worker
    finally:
        worker.running = False
        thread.join(10)
        sock.close(linger=0)
        context.term()


@contextlib.contextmanager
def uvicorn_server(app, healthy: bool = True) -> Iterator[str]:
    """Serves `app` on a free local port; yields its root URL (after /health
    answers 200 when `healthy`)."""
    import uvicorn

    # Bound here and handed to uvicorn: a probed free port could be taken before uvicorn bound it.
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    # Keep-alive past the clients' 5 s pool expiry, so no client reuses a connection as it closes.
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_keep_alive=30)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not server.started or (healthy and httpx.get(f"{url}/health").status_code != 200):
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(10)
        listener.close()


@contextlib.contextmanager
def tiny_gateway(data_dir) -> Iterator[str]:
    """A gateway with default settings (its store in `data_dir`) over a
    worker thread on the tiny engine; yields its root URL."""
    from server.app import create_app
    from server.settings import ServerSettings

    with worker_thread() as (address, _worker), uvicorn_server(
        create_app(ServerSettings(worker_address=address, data_dir=data_dir))
    ) as url:
        yield url


async def attached_client(address: str, **settings):
    """A started WorkerClient attached to the worker at `address`, once it is ready."""
    import asyncio

    from server.metrics import Metrics
    from server.settings import ServerSettings
    from server.worker_client import WorkerClient

    client = WorkerClient(ServerSettings(worker_address=address, **settings), Metrics())
    await client.start()
    deadline = time.monotonic() + 30
    while not client.ready:
        assert time.monotonic() < deadline, client.down_reason
        await asyncio.sleep(0.05)
    return client
