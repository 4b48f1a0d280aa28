"""The runs of OpenAI's Batch API (POST /v1/batches; server/routes/batches.py).

A batch names an uploaded file (server/routes/files.py) of requests in the
batch format, one endpoint for all of them. Its run, a task of a gateway:
- `validating`: reads the file; any line that is no request for the batch's
  endpoint (bad JSON, a field missing, another URL, a repeated custom_id,
  `stream`), an empty file or more than MAX_REQUESTS lines fails the batch,
  its `errors` listing the lines (as OpenAI fails it before running any);
- `in_progress`: answers the requests, `PAD_BATCH_CONCURRENCY` at a time, by
  sending each to this app in-process (server/tools/run_batch.py's sender:
  a busy server's 429 / 503 retried with backoff) with the scope of the key
  that created the batch, so each request is checked, answered and counted
  as if its client had sent it. The results come in input order and are
  stored every second with `request_counts` (schema.batch_results);
- `finalizing`, then `completed`: the stored results in input order, the 2xx
  ones in the output file and the others in the error file (purpose
  `batch_output`, owned by the batch's user), written in the transaction
  that ends the batch.
Cancelled (`cancelling`, then `cancelled`) or expired (past its 24 h
window), the results so far are still written.

A batch outlives its gateway. Each run holds a lease in the store that it
renews every third of PAD_BACKGROUND_LEASE_S (so a cancel asked through
another gateway reaches it as it renews). A gateway that stops gives the
lease up; one that dies lets it run out. Every gateway looks for such
orphaned batches every third of the lease (and at once when a read or a
cancel finds one), takes the lease of one (one gateway wins), and resumes it
after its last stored result, with the scope it ran with if the key that
created it still grants that there: no result is lost, and only the
requests whose results were not stored yet (a second's, and those held
behind a slower one) are sent again."""

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
from typing import Any

import httpx

from server.auth import INTERNAL_SCOPE
from server.auth_scopes import KeyScope, KeyTable
from server.leased_runs import LeasedRun, LeasedRuns
from server.store.batches import RUNNING_BATCH
from server.store.records import ClaimedBatch, StoredFile
from server.tools import run_batch

logger = logging.getLogger(__name__)

ENDPOINTS = run_batch.URLS
BATCH_RETRIES = 10**9  # a busy server's 429 / 503: retried until the batch's window ends
BATCH_MAX_BACKOFF_S = 5.0
# A batch's id says its API: the Batch API's ("batch_...", OpenAI's), or Anthropic's Message Batches
# ("msgbatch_...", server/routes/message_batches.py), whose files are the batch's own, not the Files API's.
BATCH_ID_PREFIX = "batch_"
MESSAGE_BATCH_ID_PREFIX = "msgbatch_"
MESSAGE_BATCH_INPUT, MESSAGE_BATCH_OUTPUT = "message_batch", "message_batch_output"  # those files' purposes
RUNNING = RUNNING_BATCH  # the statuses of a batch still running
MAX_REQUESTS = 50_000  # OpenAI's bound on a batch
MAX_LISTED_ERRORS = 100
WINDOW_S = 24 * 3600
SAVE_EVERY_S = 1.0
SPOOL_BYTES = 8 * 1024 * 1024
RESULTS_PAGE = 1000  # stored results read a page at a time into the result files
ORPHANS_PER_LOOK = 100
WORKER_WAIT_S = 0.5  # how often a batch waiting for the worker looks again


class LeaseLost(Exception):
    """Another gateway holds the batch's run now (this one's lease ran out)."""


def now() -> int:
    return int(time.time())


def new_batch(input_file_id: str, endpoint: str, metadata: dict[str, str] | None,
              id_prefix: str = BATCH_ID_PREFIX) -> dict[str, Any]:
    created = now()
    return {"id": f"{id_prefix}{uuid.uuid4().hex}", "object": "batch", "endpoint": endpoint, "errors": None,
            "input_file_id": input_file_id, "completion_window": "24h", "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": created, "in_progress_at": None,
            "expires_at": created + WINDOW_S, "finalizing_at": None, "completed_at": None, "failed_at": None,
            "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": metadata or {}}


def output_purpose(batch_id: str) -> str:
    """The purpose of a batch's result files: the Files API's `batch_output`,
    or a Message Batch's own (not listed there)."""
    return MESSAGE_BATCH_OUTPUT if batch_id.startswith(MESSAGE_BATCH_ID_PREFIX) else "batch_output"


def problem(code: str, message: str, param: str | None = None, line: int | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def failed(problems: list[dict[str, Any]]) -> dict[str, Any]:
    """The changes that fail a batch for `problems`."""
    return {"status": "failed", "failed_at": now(), "errors": {"object": "list", "data": problems[:MAX_LISTED_ERRORS]}}


def check_requests(content: bytes, endpoint: str) -> tuple[int, list[dict[str, Any]]]:
    """How many requests the file holds, and the problems that make it no
    batch for `endpoint` (each naming its 1-based line). Stops at the
    MAX_LISTED_ERRORS-th problem or past MAX_REQUESTS lines, so a huge file
    of bad lines costs no more than a few; keeps no request (they are read
    again as they are sent, `requests_after`)."""
    count, problems = 0, []
    for line in run_batch.read_lines(io.BytesIO(content)):
        count += 1
        if count > MAX_REQUESTS:
            problems.append(problem("too_many_requests", f"the input file holds more than {MAX_REQUESTS} "
                                    "requests, the most a batch takes", line=line.number))
            break
        found = line.problem
        if found is None and line.url != endpoint:
            found = f"line {line.number}: url {line.url} is not the batch's endpoint {endpoint}"
        if found is not None:
            problems.append(problem("invalid_request", found, line=line.number))
            if len(problems) >= MAX_LISTED_ERRORS:
                break
    if count == 0:
        problems.append(problem("empty_file", "the input file holds no requests"))
    return count, problems


def requests_after(content: bytes, done_through: int) -> Iterator[run_batch.BatchLine]:
    """The requests of a checked file after line `done_through` (the last
    one answered), parsed as they are sent."""
    return (line for line in run_batch.read_lines(io.BytesIO(content)) if line.number > done_through)


def scoped(app, scope: KeyScope | None):
    """The app as the batch's requests reach it: with the creating key's
    scope, each sent once the worker is ready (a worker that restarts, or
    still loads the model, holds the batch back rather than failing its
    requests; its 24 h window still runs)."""
    worker = app.state.worker

    async def with_scope(asgi_scope, receive, send):
        while not worker.ready:
            await asyncio.sleep(WORKER_WAIT_S)
        await app({**asgi_scope, INTERNAL_SCOPE: scope}, receive, send)

    return with_scope


def resumed_scope(claimed: ClaimedBatch, keys: KeyTable) -> KeyScope | None:
    """The scope a resumed batch's requests run with: exactly the one they
    ran with before (its creating key's, narrowed to the batch's user), if
    that key, as this gateway configures it now, still grants all of it.
    A ValueError says why the batch cannot go on (that key is gone, say)."""
    if not claimed.has_scope:
        raise ValueError("the batch was stopped by a server older than this one, which cannot resume it")
    if not keys.enabled:
        return None
    if claimed.key_id is None:
        raise ValueError("the batch was created without an API key, and the server now requires one")
    current = keys.scope_of(claimed.key_id)
    if current is None:
        raise ValueError("the API key that created the batch is no longer accepted")
    if current.users is not None and (claimed.users is None or not claimed.users <= current.users):
        raise ValueError("the API key that created the batch may no longer act for every user the batch acts for")
    return KeyScope(current.key_id, claimed.users)


@dataclass
class BatchRun(LeasedRun):
    batch: dict[str, Any]
    user: str | None
    scope: KeyScope | None
    output_expires_s: int | None = None  # its result files' expiry after their creation; None: kept until deleted
    resumed: bool = False  # taken over from a gateway that stopped or died: results may be stored already
    cannot_run: str | None = None  # why a resumed batch cannot go on: it fails at once
    done_through: int = 0  # the last input line whose result is stored
    counts: dict[str, int] = field(default_factory=lambda: {"total": 0, "completed": 0, "failed": 0})
    # Results not stored yet ((line, ok, JSON line) each), in input order: the next save stores them.
    unsaved: list[tuple[int, bool, str]] = field(default_factory=list)
    saving: asyncio.Lock = field(default_factory=asyncio.Lock)  # one save at a time: the stored lines stay a prefix

    def keep(self, line: run_batch.BatchLine, result: dict[str, Any]) -> None:
        ok = result["error"] is None
        self.unsaved.append((line.number, ok, json.dumps(result, ensure_ascii=False)))
        self.counts["completed" if ok else "failed"] += 1


class BatchRuns(LeasedRuns[BatchRun]):
    """This gateway's batch runs, by batch id (app.state.batches), and its
    look-out for orphaned ones to resume."""

    what = "batch"
    lost_reason = "lost"

    def __init__(self, app, store, settings) -> None:
        super().__init__(settings.background_lease_s)
        self._app = app
        self._store = store
        # Half the queue at most: interactive clients keep room beside a batch
        # (a batch's requests wait their turn; a client's get a 429 when full).
        self._concurrency = max(1, min(settings.batch_concurrency, settings.max_queue // 2))
        self._look_now = asyncio.Event()
        self._lookout: asyncio.Task | None = None
        self._closing = False

    async def start(self, batch: dict[str, Any], user: str | None, scope: KeyScope | None,
                    output_expires_s: int | None = None) -> None:
        """Stores the batch with its run's lease, then runs it as a task. Its
        requests run as its user's: a key bound to several users is narrowed
        to the batch's one."""
        if scope is not None and scope.users is not None and user is not None:
            scope = dataclasses.replace(scope, users=frozenset({user}))
        run = BatchRun(batch, user, scope, output_expires_s, token=uuid.uuid4().hex)
        await self._store.create_batch(batch, user=user, token=run.token, lease_s=self._lease_s,
                                       key_id=None if scope is None else scope.key_id,
                                       users=None if scope is None else scope.users,
                                       output_expires_s=output_expires_s)
        self._launch(run)

    def _launch(self, run: BatchRun) -> None:
        self._runs[run.batch["id"]] = run
        run.task = asyncio.ensure_future(self._run(run))

    async def _renew_lease(self, batch_id: str, run: BatchRun) -> bool | None:
        return await self._store.renew_batch(batch_id, run.token, self._lease_s)

    # ---- resuming orphaned batches ----------------------------------------
    def start_looking(self) -> None:
        """Resumes orphaned batches from now on (the app's start), looking
        at once: a gateway restarting takes its own stopped batches back."""
        self._look_now.set()
        self._lookout = asyncio.ensure_future(self._look_out())

    def look_now(self) -> None:
        """A read found an orphaned batch: look at once, not at the next tick."""
        self._look_now.set()

    async def _look_out(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._look_now.wait(), timeout=self._lease_s / 3)
            self._look_now.clear()
            if self._closing:
                return
            if not self._app.state.worker.ready:  # it could not answer them: a gateway that can may take them
                continue
            try:
                await self._resume_orphans()
            except Exception:  # the store unreachable: look again at the next tick
                logger.warning("could not look for batches to resume", exc_info=True)

    async def _resume_orphans(self) -> None:
        for batch_id in await self._store.orphaned_batches(ORPHANS_PER_LOOK):
            if self._closing:  # the gateway stops: none taken now (its runs would be given back at once)
                return
            if batch_id in self._runs:  # its own run, whose renewal is late: it renews or learns it lost
                continue
            token = uuid.uuid4().hex
            claimed = await self._store.claim_batch(batch_id, token, self._lease_s)
            if claimed is None:  # another gateway was first
                continue
            stored = claimed.stored
            scope, cannot_run = None, None
            try:
                scope = resumed_scope(claimed, self._app.state.key_table)
            except ValueError as exc:
                cannot_run = str(exc)
            logger.info("resuming batch %s (%s)", batch_id, stored.batch["status"])
            run = BatchRun(stored.batch, stored.user_id, scope, claimed.output_expires_s, resumed=True,
                           cannot_run=cannot_run, token=token,
                           counts=dict(stored.batch["request_counts"]))  # counted again from its results
            if claimed.cancel_requested:  # it ends at once (a task cancelled before it starts would never run)
                run.stop_reason = "cancelled"
            self._launch(run)

    async def close(self, timeout_s: float = 10.0) -> None:
        """Ends the look-out (let finish, not cancelled: a claim cut short
        would hold a batch no run here resumes until its lease ran out),
        then stops this gateway's runs, each giving its batch back."""
        self._closing = True
        self._look_now.set()
        if self._lookout is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._lookout), timeout_s)
            except TimeoutError:  # a store that does not answer: cut it short after all
                self._lookout.cancel()
        await super().close(timeout_s)

    # ---- the run ----------------------------------------------------------
    async def _save(self, run: BatchRun, **changes: Any) -> None:
        """Stores the batch's changes and its new results together. Shielded:
        a stop never cuts a save short (its results would be neither stored
        nor kept to store), and saves follow each other (a failed one's
        results go first in the next), so the stored lines stay a prefix of
        the input's."""
        await asyncio.shield(self._save_now(run, changes))

    async def _save_now(self, run: BatchRun, changes: dict[str, Any]) -> None:
        async with run.saving:
            batch = {**run.batch, **changes, "request_counts": dict(run.counts)}
            results, run.unsaved = run.unsaved, []
            try:
                stored = await self._store.update_batch(batch, run.token, results)
            except BaseException:
                run.unsaved[:0] = results
                raise
            if not stored:
                raise LeaseLost(run.batch["id"])
            run.batch = batch
            if results:
                run.done_through = results[-1][0]

    async def _run(self, run: BatchRun) -> None:
        run.started = True
        renewal = asyncio.ensure_future(self._renew(run.batch["id"], run))
        batch_id = run.batch["id"]
        try:
            if run.resumed:
                run.done_through, run.counts["completed"], run.counts["failed"] = \
                    await self._store.batch_progress(batch_id)
            if run.stop_reason is not None:  # stopped before it started (a cancel asked before it was resumed)
                await self._end_early(run)
                return
            await self._answer(run)
        except asyncio.CancelledError:
            await asyncio.shield(self._end_early(run))
        except LeaseLost:
            logger.warning("batch %s is run by another gateway now (this one's lease ran out)", batch_id)
        except Exception:
            logger.exception("batch %s failed", batch_id)
            with contextlib.suppress(Exception):
                await asyncio.shield(self._finish(run, **failed([problem(
                    "server_error", "The server failed to run this batch; the results so far are in its files.")])))
        finally:
            run.finishing = True
            renewal.cancel()
            self._runs.pop(batch_id, None)
            run.done.set()

    async def _answer(self, run: BatchRun) -> None:
        batch = run.batch
        if run.cannot_run is not None:
            await self._finish(run, **failed([problem("cannot_resume", run.cannot_run)]))
            return
        content = await self._store.file_content(batch["input_file_id"], expired_too=True)  # kept while it runs
        if content is None:
            await self._finish(run, **failed([problem("file_not_found", "the input file was deleted before the "
                                                      "batch was done", "input_file_id")]))
            return
        total, problems = await asyncio.to_thread(check_requests, content, batch["endpoint"])  # off the event loop
        if problems:
            await self._finish(run, **failed(problems))
            return
        run.counts["total"] = total
        started = {"status": "in_progress", "in_progress_at": now()} if batch["status"] == "validating" else {}
        await self._save(run, **started)
        saver = asyncio.ensure_future(self._save_progress(run))
        # raise_app_exceptions=False: a request the app failed on is its 500 answer, never the exception's text
        transport = httpx.ASGITransport(app=scoped(self._app, run.scope), raise_app_exceptions=False)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://pad.batch", timeout=None) as client:
                left_s = max(run.batch["expires_at"] - now(), 0)
                if run.counts["completed"] + run.counts["failed"] >= total:  # resumed with every line answered
                    left_s = None
                try:
                    # A busy server's 429 / 503 is retried for as long as the window
                    # lasts (the wait_for's timeout), not a fixed number of times.
                    await asyncio.wait_for(run_batch.run(requests_after(content, run.done_through), client, None,
                                                         concurrency=self._concurrency, on_result=run.keep,
                                                         retries=BATCH_RETRIES, max_backoff_s=BATCH_MAX_BACKOFF_S,
                                                         retry_log_level=logging.DEBUG),
                                           timeout=left_s)
                    end = {"status": "completed", "completed_at": now()}
                except TimeoutError:  # its 24 h window ran out: the results so far
                    end = {"status": "expired", "expired_at": now()}
        finally:
            saver.cancel()
        await self._finish(run, **end)

    async def _save_progress(self, run: BatchRun) -> None:
        while True:
            await asyncio.sleep(SAVE_EVERY_S)
            if run.unsaved:
                try:
                    await self._save(run)
                except LeaseLost:
                    self._stop(run, self.lost_reason)
                    return
                except Exception:
                    logger.warning("could not store the progress of batch %s", run.batch["id"], exc_info=True)

    async def _finish(self, run: BatchRun, **end: Any) -> None:
        """Ends the batch: its results (the stored ones and the rest) into
        the output and error files, and its end, in one transaction. From
        here on no stop cuts it short."""
        run.finishing = True
        if end.get("status") == "completed":
            await self._save(run, status="finalizing", finalizing_at=now())
        else:
            await self._save(run)
        _, run.counts["completed"], run.counts["failed"] = await self._store.batch_progress(run.batch["id"])
        files = await self._result_files(run)  # (the counts are those of the results written)
        ids = {key: file.file_id for key, (file, _content) in files.items()}
        batch = {**run.batch, **ids, **end, "request_counts": dict(run.counts)}
        if not await self._store.end_batch(batch, run.token, list(files.values())):
            raise LeaseLost(batch["id"])
        run.batch = batch

    async def _end_early(self, run: BatchRun) -> None:
        """A stopped run: cancelled (asked) ends with the results it had; the
        gateway stopping stores them and gives the lease up, for a gateway
        to resume it; a run that lost its lease leaves all to its new one."""
        try:
            if run.stop_reason == "cancelled":
                await self._finish(run, status="cancelled", cancelling_at=run.batch.get("cancelling_at") or now(),
                                   cancelled_at=now())  # (a resumed batch's cancelling_at: the ask's time)
            elif run.stop_reason == "stopped":
                await self._save(run)
                await self._store.release_batch(run.batch["id"], run.token)
        except LeaseLost:
            logger.warning("batch %s is run by another gateway now", run.batch["id"])
        except Exception:
            logger.exception("could not store the end of batch %s", run.batch["id"])

    async def _result_files(self, run: BatchRun) -> dict[str, tuple[StoredFile, bytes]]:
        """The output file (2xx answers) and the error file (the others) of
        the stored results, each in input order; none where there is
        nothing to write. Read a page at a time into a spool (to disk past
        a few MB)."""
        batch_id = run.batch["id"]
        files: dict[str, tuple[StoredFile, bytes]] = {}
        for key, name, ok in (("output_file_id", "output", True), ("error_file_id", "error", False)):
            with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
                after = 0
                while page := await self._store.batch_results(batch_id, ok=ok, after_line=after, limit=RESULTS_PAGE):
                    for _line, text in page:
                        spool.write(text.encode("utf-8") + b"\n")
                    after = page[-1][0]
                spool.seek(0)
                content = spool.read()
            if content:
                created = now()
                expires = None if run.output_expires_s is None else created + run.output_expires_s
                files[key] = (StoredFile(f"file-{uuid.uuid4().hex}", run.user, output_purpose(batch_id),
                                         f"{batch_id}_{name}.jsonl", len(content), created, expires), content)
        return files
