"""The events of a background response created with `stream: true`, kept so
that its stream can be read again: by the request that created it, and with
GET /v1/responses/{id}?stream=true&starting_after=N on any gateway over the
store, while the response runs or after it is done (OpenAI's resumable
background streams).

The run appends each event, an SSE frame, to its `EventLog`. The log holds
them in memory while the run lives (readers on its gateway are woken as
they come) and writes them through to the store in batches (every
`flush_s`), so a reader on another gateway, or one after the run, reads
them there (`replay`). An event's sequence_number is its index in the log.

A stream ends at its terminal event (response.completed / .incomplete /
.failed), or once the run has ended without one: a cancelled response's
stream just ends (OpenAI has no cancelled event; GET says `cancelled`); one
whose gateway died ends with a response.failed added by the reader, as the
response itself reads failed then.

Ordering the readers rely on: the run flushes every event before it gives
up its lease (server/background.py ends the lease after the work), so a
reader that saw the lease gone and then read the events has them all."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
FLUSH_S = 0.1  # how often a run writes its new events to the store
POLL_S = 0.25  # how often a reader on another gateway looks for new ones
PAGE = 500  # events read from the store per query


@dataclass(frozen=True)
class Event:
    sequence_number: int
    kind: str  # its `type`, e.g. response.output_text.delta
    frame: str  # the SSE frame as sent: "event: <kind>\ndata: <json>\n\n"


def kind_of(frame: str) -> str:
    """The event type of one of our SSE frames (its first line)."""
    first = frame.split("\n", 1)[0]
    return first.removeprefix("event: ") if first.startswith("event: ") else "message"


def frame_of(kind: str, sequence_number: int, **data: Any) -> str:
    payload = {"type": kind, "sequence_number": sequence_number, **data}
    return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"


class EventLog:
    """One running background response's events: appended by its run, read
    by any number of readers here, written through to the store."""

    def __init__(self, store, response_id: str, flush_s: float = FLUSH_S) -> None:
        self._store = store
        self.response_id = response_id
        self._flush_s = flush_s
        self.events: list[Event] = []
        self.closed = False
        self._written = 0  # events[:_written] are in the store
        self._grew = asyncio.Event()  # set (and replaced) on every append and on close
        self._flushing = asyncio.Lock()
        self._flusher: asyncio.Task | None = None

    def append(self, frames: list[str]) -> None:
        for frame in frames:
            self.events.append(Event(len(self.events), kind_of(frame), frame))
        if frames:
            self._wake()

    def start_flushing(self) -> None:
        """Writes new events every flush_s from now on, until `close` (the
        run's: started once it runs, so a run that never started leaves no task)."""
        if self._flusher is None and not self.closed:
            self._flusher = asyncio.ensure_future(self._flush_every())

    def _wake(self) -> None:
        self._grew.set()
        self._grew = asyncio.Event()

    async def flush(self) -> None:
        """Writes the events not in the store yet (one write)."""
        async with self._flushing:
            pending = self.events[self._written:]
            if pending:
                await self._store.append_response_events(self.response_id, pending)
                self._written += len(pending)

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(self._flush_s)
            try:
                await self.flush()
            except Exception:  # the store unreachable: the next flush tries again
                logger.warning("could not write the events of background response %s", self.response_id,
                               exc_info=True)

    async def close(self) -> None:
        """The run is over: its last events written, its readers ended once
        they have read them."""
        if self._flusher is not None:
            self._flusher.cancel()
        if self.closed and self._written == len(self.events):
            return
        self.closed = True
        self._wake()
        try:
            await self.flush()
        except Exception:
            logger.exception("could not write the last events of background response %s; a reader on "
                             "another gateway will miss them", self.response_id)

    async def follow(self, after: int = -1) -> AsyncIterator[str]:
        """The frames after sequence number `after`, as they come, until the
        run is over."""
        index = max(after + 1, 0)
        while True:
            grew = self._grew
            while index < len(self.events):
                yield self.events[index].frame
                index += 1
            if self.closed:
                return
            await grew.wait()


async def replay(store, response_id: str, after: int,
                 settled: Callable[[], Awaitable[dict[str, Any] | None]],
                 poll_s: float = POLL_S) -> AsyncIterator[str]:
    """The frames after `after` from the store, polling while the run (on
    another gateway) goes on; `settled` reads the response once the run is
    over (a dead gateway's response read as failed)."""
    cursor = after
    while True:
        running = await store.background_running(response_id)  # before the events: see the module's note
        while True:
            events = await store.response_events(response_id, after=cursor, limit=PAGE)
            for event in events:
                yield event.frame
                cursor = event.sequence_number
                if event.kind in TERMINAL:
                    return
            if len(events) < PAGE:
                break
        if not running:
            last = await store.last_response_event(response_id)
            if last is not None and last.kind in TERMINAL:
                return  # the reader started after the terminal event
            response = await settled()
            if response is not None and response.get("status") == "failed":  # its gateway died mid-answer
                yield frame_of("response.failed", -1 if last is None else last.sequence_number + 1,
                               response=response)
            return
        await asyncio.sleep(poll_s)
