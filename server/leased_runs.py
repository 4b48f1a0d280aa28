"""What the gateway's long runs share (a background response's,
server/background.py; a batch's, server/batches.py): each is a task of this
gateway holding a lease in the store, renewed every third of the lease so
that a run whose gateway died is seen as over once it runs out, and so that
a cancel asked through another gateway reaches the run as it renews.

A stop (a cancel, or the gateway stopping) cancels a run's task once, and
never once its work is over (`finishing`): a second stop would cut short
the clean-up of the first."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class LeasedRun:
    token: str  # its runner's, in the store's lease
    task: asyncio.Task | None = None
    stop_reason: str | None = None  # "cancelled" (asked), "stopped" (the gateway stops), or a lost_reason
    finishing: bool = False  # its work is over: no stop cancels its clean-up
    # Its task has taken its first step: a task cancelled before that never runs its code (nor its
    # clean-up), so a run stopped earlier is only marked, and its task ends it as it starts.
    started: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)


R = TypeVar("R", bound=LeasedRun)


class LeasedRuns(Generic[R]):
    """This gateway's runs of one kind, by id."""

    what = "run"  # what a run is, in logs
    # The stop reason of a run whose lease is no longer its own (deleted, or taken by another gateway):
    # a background response's is a cancel; a batch's has a new runner (server/batches.py).
    lost_reason = "cancelled"

    def __init__(self, lease_s: float) -> None:
        self._lease_s = lease_s
        self._runs: dict[str, R] = {}

    def runs_here(self, run_id: str) -> bool:
        return run_id in self._runs

    async def _renew_lease(self, run_id: str, run: R) -> bool | None:
        """The store's renewal: whether a cancel was asked (None: the lease
        is no longer this run's)."""
        raise NotImplementedError

    async def _renew(self, run_id: str, run: R) -> None:
        while True:
            await asyncio.sleep(self._lease_s / 3)
            try:
                cancel_asked = await self._renew_lease(run_id, run)
            except Exception:  # the store unreachable: try again; the lease may run out meanwhile
                logger.warning("could not renew %s %s", self.what, run_id, exc_info=True)
                continue
            if cancel_asked:  # asked through another gateway
                self._stop(run, "cancelled")
                return
            if cancel_asked is None:  # no longer ours
                self._stop(run, self.lost_reason)
                return

    def _stop(self, run: R, reason: str) -> None:
        if run.stop_reason is not None or run.finishing:
            return
        run.stop_reason = reason
        if run.task is not None and run.started:
            run.task.cancel()

    async def cancel(self, run_id: str) -> bool:
        """Cancels the run if it is this gateway's, once it has stored its
        end; False when it runs elsewhere (or not at all)."""
        run = self._runs.get(run_id)
        if run is None:
            return False
        self._stop(run, "cancelled")
        await run.done.wait()
        return True

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stops every run of this gateway (they cannot finish once it stops),
        each storing its end before the store closes."""
        runs = list(self._runs.values())
        for run in runs:
            self._stop(run, "stopped")
        if runs:
            logger.warning("stopping %d %s(s) before they were done", len(runs), self.what)
            await asyncio.wait([asyncio.ensure_future(run.done.wait()) for run in runs], timeout=timeout_s)
