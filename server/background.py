"""Background responses (`background: true` on POST /v1/responses): answered
in the gateway after the request has been answered, polled with GET
/v1/responses/{id}, cancelled with POST /v1/responses/{id}/cancel.

The request returns at once with the response `queued` (kept in the store,
so any gateway over it can read it); its run, a task of this gateway, marks
it `in_progress` once the engine has taken it, then stores its end state:
`completed` / `incomplete` as a synchronous answer would be, `failed` with
its error, or `cancelled`. Each run holds a lease in the store that it
renews every third of PAD_BACKGROUND_LEASE_S: a response whose gateway died
is read as `failed` once the lease has run out, never `in_progress`
forever; and a cancel asked through another gateway is seen by the run as
it renews. A gateway that stops fails its runs (they would not finish).
A run created with `stream: true` also holds its events' log
(server/background_events.py), which readers on this gateway follow."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from server.background_events import EventLog
from server.leased_runs import LeasedRun, LeasedRuns

logger = logging.getLogger(__name__)

RUNNING = ("queued", "in_progress")
STOPPED_ERROR = {"code": "server_error",
                 "message": "The server answering this background response stopped before it was done. "
                            "Create the response again."}


def is_running(response: dict[str, Any]) -> bool:
    return response.get("status") in RUNNING


def failed(response: dict[str, Any], error: dict[str, str] = STOPPED_ERROR) -> dict[str, Any]:
    return {**response, "status": "failed", "error": error}


# A run's work: given how to report `in_progress` and asked to stop for a
# reason, answers and stores the response (see server/routes/responses.py).
Work = Callable[["Run"], Awaitable[None]]


@dataclass
class Run(LeasedRun):
    response_id: str
    events: EventLog | None = None  # its stream's events (created with stream: true), read here while it runs


class BackgroundResponses(LeasedRuns[Run]):
    """This gateway's background runs, by response id."""

    what = "background response"

    def __init__(self, store, lease_s: float) -> None:
        super().__init__(lease_s)
        self._store = store

    def events(self, response_id: str) -> EventLog | None:
        """The event log of a streamed run of this gateway (None: not here)."""
        run = self._runs.get(response_id)
        return run.events if run is not None else None

    async def start(self, response_id: str, work: Work, events: EventLog | None = None) -> None:
        """Takes the run's lease (before the request is answered, so that a
        poll never finds it without one), then runs `work` as a task."""
        run = Run(response_id, token=uuid.uuid4().hex, events=events)
        await self._store.begin_background(response_id, run.token, self._lease_s)
        self._runs[response_id] = run
        run.task = asyncio.ensure_future(self._run(run, work))

    async def _run(self, run: Run, work: Work) -> None:
        run.started = True
        if run.stop_reason is not None:  # stopped before it started: the work's first wait is cancelled
            asyncio.current_task().cancel()
        renewal = asyncio.ensure_future(self._renew(run.response_id, run))
        if run.events is not None:
            run.events.start_flushing()
        try:
            await work(run)
        except asyncio.CancelledError:
            pass  # the work stored its state as it was cancelled
        except Exception:
            logger.exception("background response %s failed", run.response_id)
        finally:
            run.finishing = True
            renewal.cancel()
            # Every event written before the lease goes (a reader elsewhere takes a run without a
            # lease for done); the work closed its log already, unless a stop cut its clean-up short.
            if run.events is not None:
                await asyncio.shield(run.events.close())
            with contextlib.suppress(Exception):
                await asyncio.shield(self._store.end_background(run.response_id, run.token))
            self._runs.pop(run.response_id, None)
            run.done.set()

    async def _renew_lease(self, response_id: str, run: Run) -> bool | None:
        return await self._store.renew_background(response_id, run.token, self._lease_s)
