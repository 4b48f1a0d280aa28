"""The gateway's side of the IPC: one DEALER socket multiplexing every
request, and the supervision of a local worker process.

By default the gateway spawns `python -m pad_core.worker` on a free local
port and restarts it when it dies; with `worker_address` it attaches to a
worker elsewhere (another container) and only watches its heartbeat. Either
way, when the worker goes down every in-flight request fails at once with
WorkerUnavailable, and service resumes when a worker answers again.

A worker that dies before it is ever ready (a model that cannot load) is
restarted with a growing delay (1, 2, 4 ... 30 s), and /health says why; a
local worker still loading after `worker_start_timeout` is killed and
restarted. A remote worker that restarted at the same address is noticed by
its new instance id (the gateway says "hello" after a short silence).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator

import zmq
import zmq.asyncio

from pad_core.ipc import pack, unpack
from pad_core.types import ChatRequest, StepOutput
from server.metrics import Metrics
from server.settings import ServerSettings, worker_environment

logger = logging.getLogger(__name__)

HELLO_EVERY_S = 0.5
SUPERVISE_EVERY_S = 0.25
# The worker's answers to an `_ask`, matched to it by their token.
REPLIES = frozenset({"adapter_loaded", "adapter_unloaded", "adapter_failed", "tokenized", "tokenize_failed"})
MAX_TOKENIZE_IN_FLIGHT = 4  # /tokenize asks at once (a 2 MiB prompt is ~1.5 s of tokenizer time)
PING_AFTER_S = 2.0  # silence after which a ready worker is greeted again
MAX_BACKOFF_S = 30.0


class WorkerUnavailable(Exception):
    """The worker is loading, down, or died while serving the request."""


class QueueFull(Exception):
    pass


class RequestRejected(Exception):
    """The engine refused the request (its validation): an invalid request."""

    def __init__(self, error: dict):
        super().__init__(error.get("message", "invalid request"))
        self.error = error


def free_local_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


class WorkerClient:
    def __init__(self, settings: ServerSettings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.context = zmq.asyncio.Context()
        self.socket: zmq.asyncio.Socket | None = None
        self.process: subprocess.Popen | None = None
        self.state = "starting"  # starting | ready | down
        self.down_reason = "the worker is loading the model"
        self.model_info: dict = {}
        self.stats: dict = {}
        self.pending: dict[str, asyncio.Queue] = {}
        # The reward adapters the worker holds (name -> folder): those set at start, then as loaded and
        # unloaded at run time, so a worker this gateway restarts holds the same ones.
        self.adapters: dict[str, str] = {name: str(path) for name, path in settings.reward_adapters.items()}
        self._replies: dict[str, asyncio.Future] = {}  # token -> the worker's answer to an `_ask`
        self._tokenizing = 0  # /tokenize and /detokenize asks in flight
        self.instance: str | None = None
        self._last_message = time.monotonic()
        self._last_hello = 0.0
        self._launched_at = time.monotonic()
        self._was_ready = False
        self._early_exits = 0
        self._restart_at: float | None = None
        self._receiver: asyncio.Task | None = None
        self._supervisor: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def local(self) -> bool:
        return self.settings.worker_address is None

    # ---- life cycle ---------------------------------------------------
    async def start(self) -> None:
        self._launch()
        self._supervisor = asyncio.create_task(self._supervise(), name="worker-supervisor")

    async def stop(self) -> None:
        for task in (self._supervisor, self._receiver):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._fail_pending("the server is shutting down")
        if self.process is not None and self.process.poll() is None:
            # The first signal drains the worker (its requests were failed here
            # already, so nobody waits for them); the second stops it at once.
            self.process.terminate()
            if not await self._exits_within(1.0):
                self.process.terminate()
                if not await self._exits_within(10.0):
                    self.process.kill()
        if self.socket is not None:
            self.socket.close(linger=0)
        self.context.term()

    async def _exits_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(asyncio.to_thread(self.process.wait), timeout=seconds)
            return True
        except TimeoutError:
            return False

    def worker_environment(self) -> dict[str, str]:
        """The PAD_* variables a spawned worker reads its settings from, with
        the reward adapters as loaded and unloaded at run time since start."""
        return {**worker_environment(self.settings), "PAD_REWARD_ADAPTERS": json.dumps(self.adapters)}

    def _launch(self) -> None:
        """Spawns a local worker (or targets the external one) and connects."""
        address = self.settings.worker_address
        if address is None:
            address = free_local_address()
            env = {**os.environ, **self.worker_environment()}
            command = [sys.executable, "-m", "pad_core.worker", "--bind", address, "--log-level", self.settings.log_level,
                       "--parent-pid", str(os.getpid())]
            # Its own session: a terminal's Ctrl+C (SIGINT to the foreground
            # group) reaches the gateway alone, which drains its streams and then
            # stops the worker; a signal to the worker itself drains it too.
            self.process = subprocess.Popen(command, env=env, start_new_session=True)
            logger.info("started worker pid %d on %s", self.process.pid, address)
        if self.socket is not None:
            self.socket.close(linger=0)
        if self._receiver is not None:
            self._receiver.cancel()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)
        self.state, self.down_reason = "starting", "the worker is loading the model"
        self.instance = None
        self._last_message = self._launched_at = time.monotonic()
        self._was_ready = False
        self._receiver = asyncio.create_task(self._receive(self.socket), name="worker-receiver")

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(SUPERVISE_EVERY_S)
            try:
                await self._supervise_once(time.monotonic())
            except Exception:  # supervision must go on
                logger.exception("worker supervision failed")

    async def _supervise_once(self, now: float) -> None:
        if self.process is not None and self.process.poll() is not None:
            if self._restart_at is None:
                # A worker that never got ready (a model that cannot load)
                # is retried with a growing delay; one that served, at once.
                self._early_exits = 0 if self._was_ready else self._early_exits + 1
                delay = min(MAX_BACKOFF_S, 2.0 ** (self._early_exits - 1)) if self._early_exits else 0.0
                when = f" in {delay:.0f} s" if delay else ""
                self._mark_down(f"the worker process exited (code {self.process.returncode}); restarting it{when}")
                self._restart_at = now + delay
            if now >= self._restart_at:
                self._restart_at = None
                self.metrics.worker_restarts.inc()
                self._launch()
            return
        if (self.process is not None and self.state == "starting"
                and now - self._launched_at > self.settings.worker_start_timeout):
            logger.error("the worker did not get ready in %.0f s (worker_start_timeout); killing it",
                         self.settings.worker_start_timeout)
            self.process.kill()
            return
        # A remote worker is judged by its heartbeat (sent between steps, every
        # HEARTBEAT_S). A local one by its process, and by its heartbeat too: a
        # live process silent that long is hung (a step is bounded by the
        # prefill piece), and is killed, so the exit above restarts it.
        silent = now - self._last_message
        if self.state == "ready" and silent > self.settings.worker_heartbeat_timeout:
            if self.process is None:
                self._mark_down("the worker stopped answering")
            else:
                logger.error("the worker has not answered for %.0f s (worker_heartbeat_timeout); killing it", silent)
                self.process.kill()
            return
        since_hello = now - self._last_hello
        if (since_hello > HELLO_EVERY_S and self.state != "ready") or (
            since_hello > PING_AFTER_S and silent > PING_AFTER_S
        ):
            self._last_hello = now
            await self._send({"type": "hello"})

    async def _receive(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            try:
                message = unpack(await sock.recv())
            except ValueError:
                logger.warning("dropping a malformed message from the worker")
                continue
            self._last_message = time.monotonic()
            self._dispatch(message)

    def _dispatch(self, message: dict) -> None:
        kind = message["type"]
        instance = message.get("instance")
        if instance is not None and instance != self.instance:
            if self.instance is not None:
                # Same address, new process: what the old one ran is gone.
                self._fail_pending("the worker restarted; the request was lost")
                self.metrics.worker_restarts.inc()
                if kind != "ready":  # it must say ready before taking requests
                    self.state, self.down_reason = "starting", "the worker restarted"
                    self.metrics.worker_up.set(0)
                self._forget_worker_stats()  # the new instance's own, if it sent any, follow
            self.instance = instance
        if "stats" in message:
            self.stats = message["stats"]
            self.metrics.update_worker_stats(self.stats, self.instance)
        if kind == "ready":
            if self.state != "ready":
                logger.info("worker ready: %s", message["info"])
            self.model_info = message["info"]
            self.state = "ready"
            self._was_ready = True
            self._early_exits = 0
            self.metrics.worker_up.set(1)
        elif kind == "outputs":
            for data in message["outputs"]:
                queue = self.pending.get(data["request_id"])
                if queue is not None:
                    queue.put_nowait(StepOutput.from_dict(data))
        elif kind == "rejected":
            queue = self.pending.get(message["request_id"])
            if queue is not None:
                queue.put_nowait(RequestRejected(message["error"]))
        elif kind in REPLIES:
            waiter = self._replies.pop(message["token"], None)
            if waiter is not None and not waiter.done():
                waiter.set_result(message)
            if kind in ("adapter_loaded", "adapter_unloaded"):
                self.model_info = message["info"]
        elif kind == "model_info":  # another gateway of this worker loaded or unloaded a reward adapter
            self.model_info = message["info"]
        elif kind == "stopping":  # new requests get a 503 at once; the ones it took still stream
            if self.state != "stopping":
                logger.warning("worker stopping: finishing the requests it took")
            self.state, self.down_reason = "stopping", "the worker is shutting down"
            self.metrics.worker_up.set(0)
        elif kind == "stopped":
            self._mark_down("the worker stopped")

    def _mark_down(self, reason: str) -> None:
        logger.warning("worker down: %s", reason)
        self.state, self.down_reason = "down", reason
        self.metrics.worker_up.set(0)
        self._forget_worker_stats()
        self._fail_pending(reason)

    def _forget_worker_stats(self) -> None:
        """The queue and batch gauges report the worker's last stats; a dead
        worker's requests are gone (failed here), so they read 0 until a
        worker speaks again, not the dead one's last values for as long as no
        new one gets ready (a model that no longer loads, a remote worker
        that stays away)."""
        self.stats = {}
        self.metrics.update_worker_stats(self.stats)

    def _fail_pending(self, reason: str) -> None:
        for queue in self.pending.values():
            queue.put_nowait(WorkerUnavailable(reason))
        self.pending.clear()
        for waiter in self._replies.values():
            if not waiter.done():
                waiter.set_exception(WorkerUnavailable(reason))
        self._replies.clear()

    async def _send(self, message: dict) -> None:
        if self.socket is not None:
            await self.socket.send(pack(message))

    # ---- requests -----------------------------------------------------
    def check_available(self, needed: int = 1) -> None:
        """WorkerUnavailable, or QueueFull unless `needed` more requests fit
        (a request's n choices are taken together or not at all)."""
        if not self.ready:
            raise WorkerUnavailable(self.down_reason)
        if len(self.pending) + needed > self.settings.max_queue:
            raise QueueFull(f"the server has {len(self.pending)} requests in flight (max_queue); retry later")

    async def generate(self, chat: ChatRequest) -> AsyncIterator[StepOutput]:
        """Sends the request; yields its outputs until the last one. Leaving
        early (a client that went away) aborts it in the worker."""
        self.check_available()
        queue: asyncio.Queue = asyncio.Queue()
        self.pending[chat.request_id] = queue
        self.metrics.in_flight.set(len(self.pending))
        finished = False
        try:
            try:
                message = pack({"type": "add", "request": chat.to_dict()})
            except (OverflowError, ValueError) as exc:  # a value msgpack cannot carry that verify missed
                finished = True  # never sent: nothing to abort
                logger.warning("request %s cannot be sent to the worker: %s", chat.request_id, exc)
                raise RequestRejected({"message": f"the request holds a value that cannot be sent to the worker "
                                                  f"({exc})", "param": None, "code": "invalid_value"}) from None
            if self.socket is not None:
                await self.socket.send(message)
            while not finished:
                item = await queue.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            self.pending.pop(chat.request_id, None)
            self.metrics.in_flight.set(len(self.pending))
            if not finished and self.ready:
                await self._send({"type": "abort", "request_id": chat.request_id})

    async def _ask(self, message: dict, timeout: float, forgettable: bool = False) -> dict:
        """Sends `message` with a fresh token and waits for the worker's reply
        carrying it (WorkerUnavailable if the worker goes down meanwhile or
        stays silent past `timeout`). A `forgettable` ask that nobody waits
        for any more (timed out, or its client left) is withdrawn, so the
        worker does not spend its tokenizer thread on it."""
        if not self.ready:
            raise WorkerUnavailable(self.down_reason)
        token = uuid.uuid4().hex
        waiter = asyncio.get_running_loop().create_future()
        self._replies[token] = waiter
        try:
            await self._send({**message, "token": token})
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise WorkerUnavailable(f"the worker did not answer a {message['type']!r} in {timeout:g} s") from None
        finally:
            self._replies.pop(token, None)
            unanswered = not waiter.done() or waiter.cancelled()  # wait_for cancels it on a timeout
            if forgettable and unanswered and self.ready:
                await self._send({"type": "forget", "token": token})

    async def tokenize(self, payload: dict, timeout: float = 60.0) -> dict:
        """The worker's tokenizer on `payload` (pad_core/tokenization.py):
        a chat, a raw prompt or token ids to decode."""
        # Each ask is work for the worker's one tokenizer thread, which every
        # chat's prompt also needs: a few at a time, the rest told to retry.
        if self._tokenizing >= MAX_TOKENIZE_IN_FLIGHT:
            raise QueueFull(f"{self._tokenizing} tokenize requests are in flight; retry later")
        self._tokenizing += 1
        try:
            reply = await self._ask({"type": "tokenize", "request": payload}, timeout, forgettable=True)
        finally:
            self._tokenizing -= 1
        if reply["type"] == "tokenize_failed":
            raise RequestRejected(reply["error"])
        return reply["result"]

    async def load_adapter(self, name: str, path: str, timeout: float = 300.0) -> dict:
        """Loads a reward adapter in the worker; returns the new model info."""
        reply = await self._ask({"type": "load_adapter", "name": name, "path": path}, timeout)
        if reply["type"] == "adapter_failed":
            raise RequestRejected(reply["error"])
        self.adapters[name] = path
        return reply["info"]

    async def unload_adapter(self, name: str, timeout: float = 60.0) -> dict:
        """Unloads a reward adapter from the worker (freed once the requests
        using it end); returns the reply: the new model info and how many
        requests still use it."""
        reply = await self._ask({"type": "unload_adapter", "name": name}, timeout)
        if reply["type"] == "adapter_failed":
            raise RequestRejected(reply["error"])
        self.adapters.pop(name, None)
        return reply
