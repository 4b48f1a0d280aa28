"""The runs of OpenAI's Batch API (POST /v1/batches; server/routes/batches.py).

A batch names an uploaded file (server/routes/files.py) of requests in the
batch format, one endpoint for all of them. Its run, a task of the gateway
that created it:
- `validating`: reads the file; any line that is no request for the batch's
  endpoint (bad JSON, a field missing, another URL, a repeated custom_id,
  `stream`), an empty file or more than MAX_REQUESTS lines fails the batch,
  its `errors` listing the lines (as OpenAI fails it before running any);
- `in_progress`: answers the requests, `PAD_BATCH_CONCURRENCY` at a time, by
  sending each to this app in-process (server/tools/run_batch.py's sender:
  a busy server's 429 / 503 retried with backoff) with the scope of the key
  that created the batch, so each request is checked, answered and counted
  as if its client had sent it; `request_counts` are stored every second;
- `finalizing`, then `completed`: the results in input order, the 2xx ones
  in the output file and the others in the error file (purpose
  `batch_output`, owned by the batch's user).
Cancelled (`cancelling`, then `cancelled`), expired (past its 24 h window)
or stopped with its gateway (`failed`), the results so far are still
written. Each run holds a lease in the store that it renews every third of
PAD_BACKGROUND_LEASE_S: a batch whose gateway died reads `failed` once the
lease has run out, and a cancel asked through another gateway reaches the
run as it renews. (A batch is not taken over by another gateway.)"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import httpx

from server.auth import INTERNAL_SCOPE
from server.auth_scopes import KeyScope
from server.leased_runs import LeasedRun, LeasedRuns
from server.store.repository import RUNNING_BATCH, StoredFile
from server.tools import run_batch

logger = logging.getLogger(__name__)

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
RUNNING = RUNNING_BATCH  # the statuses of a batch still running (the store's, which settles abandoned ones)
MAX_REQUESTS = 50_000  # OpenAI's bound on a batch
MAX_LISTED_ERRORS = 100
WINDOW_S = 24 * 3600
SAVE_EVERY_S = 1.0
SPOOL_BYTES = 8 * 1024 * 1024
STOPPED = {"code": "server_stopped", "message": "The server running this batch stopped before it was done; "
                                                "the results so far are in its files. Create the batch again "
                                                "for the rest.", "param": None, "line": None}


def now() -> int:
    return int(time.time())


def new_batch(input_file_id: str, endpoint: str, metadata: dict[str, str] | None) -> dict[str, Any]:
    created = now()
    return {"id": f"batch_{uuid.uuid4().hex}", "object": "batch", "endpoint": endpoint, "errors": None,
            "input_file_id": input_file_id, "completion_window": "24h", "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": created, "in_progress_at": None,
            "expires_at": created + WINDOW_S, "finalizing_at": None, "completed_at": None, "failed_at": None,
            "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": metadata or {}}


def errors_of(problems: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": problems[:MAX_LISTED_ERRORS]}


def failed(batch: dict[str, Any], problems: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The batch failed (its gateway stopped, unless `problems` say why)."""
    return {**batch, "status": "failed", "failed_at": now(), "errors": errors_of(problems or [STOPPED])}


def check_requests(content: bytes, endpoint: str) -> tuple[int, list[dict[str, Any]]]:
    """How many requests the file holds, and the problems that make it no
    batch for `endpoint` (each naming its 1-based line). Stops at the
    MAX_LISTED_ERRORS-th problem or past MAX_REQUESTS lines, so a huge file
    of bad lines costs no more than a few; keeps no request (they are read
    again as they are sent, `requests_in`)."""
    count, problems = 0, []
    for line in run_batch.read_lines(io.BytesIO(content)):
        count += 1
        if count > MAX_REQUESTS:
            problems.append({"code": "too_many_requests", "message": f"the input file holds more than "
                             f"{MAX_REQUESTS} requests, the most a batch takes", "param": None, "line": line.number})
            break
        problem = line.problem
        if problem is None and line.url != endpoint:
            problem = f"line {line.number}: url {line.url} is not the batch's endpoint {endpoint}"
        if problem is not None:
            problems.append({"code": "invalid_request", "message": problem, "param": None, "line": line.number})
            if len(problems) >= MAX_LISTED_ERRORS:
                break
    if count == 0:
        problems.append({"code": "empty_file", "message": "the input file holds no requests", "param": None,
                         "line": None})
    return count, problems


def requests_in(content: bytes) -> Iterator[run_batch.BatchLine]:
    """The requests of a checked file, parsed as they are sent."""
    return run_batch.read_lines(io.BytesIO(content))


def scoped(app, scope: KeyScope | None):
    """The app as the batch's requests reach it: with the creating key's scope."""

    async def with_scope(asgi_scope, receive, send):
        await app({**asgi_scope, INTERNAL_SCOPE: scope}, receive, send)

    return with_scope


@dataclass
class BatchRun(LeasedRun):
    batch: dict[str, Any]
    user: str | None
    scope: KeyScope | None
    # The results so far, as the lines of the output file (2xx answers) and of the error file, spooled
    # to disk past a few MB: a batch of long answers is not held in memory.
    answered: IO[bytes] = field(default_factory=lambda: tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES))
    refused: IO[bytes] = field(default_factory=lambda: tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES))
    counts: dict[str, int] = field(default_factory=lambda: {"total": 0, "completed": 0, "failed": 0})

    def keep(self, result: dict[str, Any]) -> None:
        ok = result["error"] is None
        (self.answered if ok else self.refused).write(json.dumps(result, ensure_ascii=False).encode("utf-8") + b"\n")
        self.counts["completed" if ok else "failed"] += 1


class BatchRuns(LeasedRuns[BatchRun]):
    """This gateway's batch runs, by batch id (app.state.batches)."""

    what = "batch"

    def __init__(self, app, store, settings) -> None:
        super().__init__(settings.background_lease_s)
        self._app = app
        self._store = store
        self._concurrency = settings.batch_concurrency

    async def start(self, batch: dict[str, Any], user: str | None, scope: KeyScope | None) -> None:
        """Stores the batch with its run's lease, then runs it as a task. Its
        requests run as its user's: a key bound to several users is narrowed
        to the batch's one."""
        if scope is not None and scope.users is not None and user is not None:
            scope = dataclasses.replace(scope, users=frozenset({user}))
        run = BatchRun(batch, user, scope, token=uuid.uuid4().hex)
        await self._store.create_batch(batch, user=user, token=run.token, lease_s=self._lease_s)
        self._runs[batch["id"]] = run
        run.task = asyncio.ensure_future(self._run(run))

    async def _renew_lease(self, batch_id: str, run: BatchRun) -> bool | None:
        return await self._store.renew_batch(batch_id, run.token, self._lease_s)

    # ---- the run ----------------------------------------------------------
    async def _save(self, run: BatchRun, **changes: Any) -> None:
        run.batch = {**run.batch, **changes}
        await self._store.update_batch(run.batch, run.token)

    async def _run(self, run: BatchRun) -> None:
        renewal = asyncio.ensure_future(self._renew(run.batch["id"], run))
        batch_id = run.batch["id"]
        try:
            await self._answer(run)
        except asyncio.CancelledError:
            await asyncio.shield(self._end_early(run))
        except Exception:
            logger.exception("batch %s failed", batch_id)
            with contextlib.suppress(Exception):
                await asyncio.shield(self._save(run, **failed(run.batch, [
                    {"code": "server_error", "message": "The server failed to run this batch.", "param": None,
                     "line": None}])))
        finally:
            run.finishing = True
            renewal.cancel()
            with contextlib.suppress(Exception):
                await asyncio.shield(self._store.end_batch_run(batch_id, run.token))
            self._runs.pop(batch_id, None)
            run.answered.close()
            run.refused.close()
            run.done.set()

    async def _answer(self, run: BatchRun) -> None:
        batch = run.batch
        content = await self._store.file_content(batch["input_file_id"])
        if content is None:
            run.finishing = True  # from here on no stop cuts its end short
            await self._save(run, **failed(batch, [{"code": "file_not_found", "message": "the input file was "
                                                    "deleted before the batch ran", "param": "input_file_id",
                                                    "line": None}]))
            return
        total, problems = await asyncio.to_thread(check_requests, content, batch["endpoint"])  # off the event loop
        if problems:
            run.finishing = True
            await self._save(run, **failed(batch, problems))
            return
        run.counts["total"] = total
        await self._save(run, status="in_progress", in_progress_at=now(), request_counts=dict(run.counts))
        saver = asyncio.ensure_future(self._save_counts(run))
        # raise_app_exceptions=False: a request the app failed on is its 500 answer, never the exception's text
        transport = httpx.ASGITransport(app=scoped(self._app, run.scope), raise_app_exceptions=False)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://pad.batch", timeout=None) as client:
                left_s = max(run.batch["expires_at"] - now(), 0)
                try:
                    await asyncio.wait_for(run_batch.run(requests_in(content), client, None,
                                                         concurrency=self._concurrency, on_result=run.keep),
                                           timeout=left_s)
                    end = {"status": "completed", "completed_at": now()}
                except TimeoutError:  # its 24 h window ran out: the results so far
                    end = {"status": "expired", "expired_at": now()}
        finally:
            saver.cancel()
        run.finishing = True
        await self._finish(run, **end)

    async def _save_counts(self, run: BatchRun) -> None:
        saved = dict(run.counts)
        while True:
            await asyncio.sleep(SAVE_EVERY_S)
            if run.counts != saved:
                saved = dict(run.counts)
                try:
                    await self._save(run, request_counts=saved)
                except Exception:
                    logger.warning("could not store the progress of batch %s", run.batch["id"], exc_info=True)

    async def _finish(self, run: BatchRun, **end: Any) -> None:
        """Writes the results so far into the output and error files, then
        stores the batch's end."""
        if end.get("status") == "completed":
            await self._save(run, status="finalizing", finalizing_at=now(), request_counts=dict(run.counts))
        files = await self._write_results(run)
        await self._save(run, **{**files, **end, "request_counts": dict(run.counts)})

    async def _end_early(self, run: BatchRun) -> None:
        """A stopped run: cancelled (asked) or failed (its gateway stops),
        with the results it had."""
        try:
            if run.stop_reason == "cancelled":
                await self._finish(run, status="cancelled", cancelling_at=now(), cancelled_at=now())
            else:
                files = await self._write_results(run)
                await self._save(run, **{**failed(run.batch), **files, "request_counts": dict(run.counts)})
        except Exception:
            logger.exception("could not store the end of batch %s", run.batch["id"])

    async def _write_results(self, run: BatchRun) -> dict[str, str | None]:
        """The output file (2xx answers) and the error file (the others),
        each in input order; None where there is nothing to write."""
        batch_id = run.batch["id"]
        ids: dict[str, str | None] = {"output_file_id": None, "error_file_id": None}
        for key, name, spool in (("output_file_id", "output", run.answered), ("error_file_id", "error", run.refused)):
            spool.seek(0)
            content = spool.read()
            if not content:
                continue
            file = StoredFile(f"file-{uuid.uuid4().hex}", run.user, "batch_output", f"{batch_id}_{name}.jsonl",
                              len(content), now())
            await self._store.record_file(file, content)
            ids[key] = file.file_id
        return ids
