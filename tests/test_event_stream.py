"""server/generation.py's EventStream: its cleanup (the events generator
closed, then the on_close callbacks: the generation's aborts, a
conversation's turn given back) runs as the response ends, however it
ends, including a client gone before the first event, when the events
generator never started and would otherwise wait for the garbage
collector."""

from __future__ import annotations

import pytest

from server.generation import EventStream

SCOPE = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "method": "POST", "path": "/"}


async def receive() -> dict:
    return {"type": "http.disconnect"}


def recorded():
    happened: list[str] = []

    async def events():
        happened.append("started")
        try:
            for index in range(3):
                yield f"data: {index}\n\n"
        finally:
            happened.append("events closed")

    async def on_close() -> None:
        happened.append("on_close")

    return happened, events(), on_close


async def test_a_stream_sent_whole_cleans_up_once_sent():
    happened, events, on_close = recorded()
    sent = []

    async def send(message: dict) -> None:
        sent.append(message)

    await EventStream(events, [on_close])(SCOPE, receive, send)
    assert [m.get("body") for m in sent if m["type"] == "http.response.body"][:3] == [b"data: 0\n\n", b"data: 1\n\n",
                                                                                      b"data: 2\n\n"]
    assert happened == ["started", "events closed", "on_close"]


@pytest.mark.parametrize("fail_at", [0, 2])  # the response's start (no event yet), or its second event
async def test_a_client_gone_still_cleans_up(fail_at):
    happened, events, on_close = recorded()
    messages = 0

    async def send(message: dict) -> None:
        nonlocal messages
        if messages == fail_at:
            raise OSError("the client went away")
        messages += 1

    with pytest.raises(Exception):  # starlette's ClientDisconnect
        await EventStream(events, [on_close])(SCOPE, receive, send)
    if fail_at == 0:  # never started: closed without running, and the callbacks still run
        assert happened == ["on_close"]
        with pytest.raises(StopAsyncIteration):
            await events.__anext__()
    else:
        assert happened == ["started", "events closed", "on_close"]
