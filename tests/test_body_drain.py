"""server/request_body.py's drain of a refused body, on a fake ASGI receive:
it stops at the body's end, at a pause, at its byte cap and at its time
limit (even for a client that drips), and a chunked body refused after
`Expect: 100-continue` was answered is drained too."""

from __future__ import annotations

import asyncio
import time

import pytest

from server import request_body
from server.request_body import BodyLimitMiddleware, drain


def dripping(chunk: bytes, every_s: float, count: int | None = None):
    sent = 0

    async def receive():
        nonlocal sent
        await asyncio.sleep(every_s)
        sent += 1
        return {"type": "http.request", "body": chunk, "more_body": count is None or sent < count}

    return receive


async def test_drain_reads_to_the_end_of_the_body():
    assert await drain(dripping(b"x" * 1000, 0, count=5)) == 5000


async def test_drain_stops_when_the_client_pauses(monkeypatch):
    monkeypatch.setattr(request_body, "DRAIN_IDLE_S", 0.05)
    started = time.perf_counter()
    assert await drain(dripping(b"x", 10.0)) == 0
    assert time.perf_counter() - started < 1


async def test_drain_stops_at_its_byte_cap(monkeypatch):
    monkeypatch.setattr(request_body, "DRAIN_BYTES", 10_000)
    assert 10_000 < await drain(dripping(b"x" * 4096, 0)) <= 10_000 + 4096


@pytest.mark.parametrize("every_s", [0.01, 0.03])
async def test_drain_stops_at_its_time_limit_for_a_client_that_drips(monkeypatch, every_s):
    monkeypatch.setattr(request_body, "DRAIN_S", 0.3)
    monkeypatch.setattr(request_body, "DRAIN_IDLE_S", 0.05)
    started = time.perf_counter()
    await drain(dripping(b"x", every_s))
    assert time.perf_counter() - started < 0.3 + 0.1


async def test_a_chunked_body_past_the_limit_is_drained_even_after_100_continue():
    """Reading the body sent "100 Continue": the rest is on its way, and
    closing on it would reset the connection before the 413 is read."""
    consumed = []

    async def receive():
        consumed.append(1)
        return {"type": "http.request", "body": b"x" * 600, "more_body": len(consumed) < 10}

    sent = []

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        raise AssertionError("a refused body never reaches the app")

    middleware = BodyLimitMiddleware(app, limit=1000)
    scope = {"type": "http", "method": "PUT", "path": "/v1/users/alice/preferences",
             "headers": [(b"expect", b"100-continue"), (b"transfer-encoding", b"chunked")]}
    await middleware(scope, receive, send)
    assert len(consumed) == 10  # every chunk read
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
