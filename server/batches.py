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
import io
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from server.auth import INTERNAL_SCOPE
from server.auth_scopes import KeyScope
from server.store.repository import StoredFile
from server.tools import run_batch

logger = logging.getLogger(__name__)

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
RUNNING = ("validating", "in_progress", "finalizing", "cancelling")
MAX_REQUESTS = 50_000  # OpenAI's bound on a batch
MAX_LISTED_ERRORS = 100
WINDOW_S = 24 * 3600
SAVE_EVERY_S = 1.0
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


def requests_of(content: bytes, endpoint: str) -> tuple[list[run_batch.BatchLine], list[dict[str, Any]]]:
    """The file's requests, and the problems that make it no batch for
    `endpoint` (each naming its 1-based line)."""
    lines, problems = [], []
    for line in run_batch.read_lines(io.BytesIO(content)):
        problem = line.problem
        if problem is None and line.url != endpoint:
            problem = f"line {line.number}: url {line.url} is not the batch's endpoint {endpoint}"
        if problem is not None:
            problems.append({"code": "invalid_request", "message": problem, "param": None, "line": line.number})
        lines.append(line)
    if not lines:
        problems.append({"code": "empty_file", "message": "the input file holds no requests", "param": None,
                         "line": None})
    if len(lines) > MAX_REQUESTS:
        problems.append({"code": "too_many_requests", "message": f"the input file holds {len(lines)} requests, "
                         f"at most {MAX_REQUESTS} a batch", "param": None, "line": None})
    return lines, problems


def scoped(app, scope: KeyScope | None):
    """The app as the batch's requests reach it: with the creating key's scope."""

    async def with_scope(asgi_scope, receive, send):
        await app({**asgi_scope, INTERNAL_SCOPE: scope}, receive, send)

    return with_scope


@dataclass
class BatchRun:
    batch: dict[str, Any]
    user: str | None
    scope: KeyScope | None
    token: str
    task: asyncio.Task | None = None
    stop_reason: str | None = None  # "cancelled" or "stopped" (the gateway stops)
    finishing: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)
    results: list[dict[str, Any]] = field(default_factory=list)


class BatchRuns:
    """This gateway's batch runs, by batch id (app.state.batches)."""

    def __init__(self, app, store, settings) -> None:
        self._app = app
        self._store = store
        self._lease_s = settings.background_lease_s
        self._concurrency = settings.batch_concurrency
        self._runs: dict[str, BatchRun] = {}

    def runs_here(self, batch_id: str) -> bool:
        return batch_id in self._runs

    async def start(self, batch: dict[str, Any], user: str | None, scope: KeyScope | None) -> None:
        """Stores the batch with its run's lease, then runs it as a task."""
        run = BatchRun(batch, user, scope, uuid.uuid4().hex)
        await self._store.create_batch(batch, user=user, token=run.token, lease_s=self._lease_s)
        self._runs[batch["id"]] = run
        run.task = asyncio.ensure_future(self._run(run))

    async def cancel(self, batch_id: str) -> bool:
        """Cancels this gateway's run once it has stored its end; False when
        it runs elsewhere (or not at all)."""
        run = self._runs.get(batch_id)
        if run is None:
            return False
        self._stop(run, "cancelled")
        await run.done.wait()
        return True

    async def close(self, timeout_s: float = 10.0) -> None:
        runs = list(self._runs.values())
        for run in runs:
            self._stop(run, "stopped")
        if runs:
            logger.warning("stopping %d batch(es) before they were done", len(runs))
            await asyncio.wait([asyncio.ensure_future(run.done.wait()) for run in runs], timeout=timeout_s)

    def _stop(self, run: BatchRun, reason: str) -> None:
        if run.stop_reason is not None or run.finishing:
            return
        run.stop_reason = reason
        if run.task is not None:
            run.task.cancel()

    # ---- the run ----------------------------------------------------------
    async def _save(self, run: BatchRun, **changes: Any) -> None:
        run.batch = {**run.batch, **changes}
        await self._store.update_batch(run.batch, run.token)

    async def _run(self, run: BatchRun) -> None:
        renewal = asyncio.ensure_future(self._renew(run))
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
            run.done.set()

    async def _answer(self, run: BatchRun) -> None:
        batch = run.batch
        content = await self._store.file_content(batch["input_file_id"])
        if content is None:
            await self._save(run, **failed(batch, [{"code": "file_not_found", "message": "the input file was "
                                                    "deleted before the batch ran", "param": "input_file_id",
                                                    "line": None}]))
            return
        lines, problems = await asyncio.to_thread(requests_of, content, batch["endpoint"])  # off the event loop
        del content
        if problems:
            await self._save(run, **failed(batch, problems))
            return
        counts = {"total": len(lines), "completed": 0, "failed": 0}
        await self._save(run, status="in_progress", in_progress_at=now(), request_counts=dict(counts))

        def on_result(result: dict[str, Any]) -> None:
            run.results.append(result)
            counts["completed" if result["error"] is None else "failed"] += 1

        saver = asyncio.ensure_future(self._save_counts(run, counts))
        transport = httpx.ASGITransport(app=scoped(self._app, run.scope))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://pad.batch", timeout=None) as client:
                left_s = max(run.batch["expires_at"] - now(), 0)
                try:
                    await asyncio.wait_for(run_batch.run(iter(lines), client, None, concurrency=self._concurrency,
                                                         on_result=on_result), timeout=left_s)
                except TimeoutError:  # its 24 h window ran out: the results so far
                    await self._finish(run, counts, status="expired", expired_at=now())
                    return
        finally:
            saver.cancel()
        await self._finish(run, counts, status="completed", completed_at=now())

    async def _save_counts(self, run: BatchRun, counts: dict[str, int]) -> None:
        saved = dict(counts)
        while True:
            await asyncio.sleep(SAVE_EVERY_S)
            if counts != saved:
                saved = dict(counts)
                try:
                    await self._save(run, request_counts=saved)
                except Exception:
                    logger.warning("could not store the progress of batch %s", run.batch["id"], exc_info=True)

    async def _finish(self, run: BatchRun, counts: dict[str, int], **end: Any) -> None:
        """Writes the results so far into the output and error files, then
        stores the batch's end."""
        if end.get("status") == "completed":
            await self._save(run, status="finalizing", finalizing_at=now(), request_counts=dict(counts))
        files = await self._write_results(run)
        await self._save(run, **{**files, **end, "request_counts": dict(counts)})

    async def _end_early(self, run: BatchRun) -> None:
        """A stopped run: cancelled (asked) or failed (its gateway stops),
        with the results it had."""
        counts = {"total": run.batch["request_counts"]["total"],
                  "completed": sum(r["error"] is None for r in run.results),
                  "failed": sum(r["error"] is not None for r in run.results)}
        try:
            if run.stop_reason == "cancelled":
                await self._finish(run, counts, status="cancelled", cancelling_at=now(), cancelled_at=now())
            else:
                files = await self._write_results(run)
                await self._save(run, **{**failed(run.batch), **files, "request_counts": counts})
        except Exception:
            logger.exception("could not store the end of batch %s", run.batch["id"])

    async def _write_results(self, run: BatchRun) -> dict[str, str | None]:
        """The output file (2xx answers) and the error file (the others),
        each in input order; None where there is nothing to write."""
        batch_id = run.batch["id"]
        ids: dict[str, str | None] = {"output_file_id": None, "error_file_id": None}
        for key, name, wanted in (("output_file_id", "output", True), ("error_file_id", "error", False)):
            chosen = [r for r in run.results if (r["error"] is None) == wanted]
            if not chosen:
                continue
            content = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen).encode("utf-8")
            file = StoredFile(f"file-{uuid.uuid4().hex}", run.user, "batch_output", f"{batch_id}_{name}.jsonl",
                              len(content), now())
            await self._store.record_file(file, content)
            ids[key] = file.file_id
        return ids

    async def _renew(self, run: BatchRun) -> None:
        while True:
            await asyncio.sleep(self._lease_s / 3)
            try:
                cancel_asked = await self._store.renew_batch(run.batch["id"], run.token, self._lease_s)
            except Exception:
                logger.warning("could not renew batch %s", run.batch["id"], exc_info=True)
                continue
            if cancel_asked or cancel_asked is None:
                self._stop(run, "cancelled")
                return
