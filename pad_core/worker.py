"""The worker process: the engine behind a ZeroMQ ROUTER socket.

    python -m pad_core.worker --bind tcp://0.0.0.0:5557      (settings from PAD_*)

Loop: take every waiting message (without blocking while requests run),
queue the chats whose prompts are ready, run one engine step, send each
gateway the outputs of its requests. A bad request is answered with
"rejected" and never stops the loop.

Chats are validated and tokenized in a thread of their own (the tokenizer
releases the GIL), never in the loop: a huge prompt delays its own first
token, not the tokens of the requests already decoding.

The ZeroMQ port has no authentication or encryption: whoever reaches it can
submit requests and load adapters. Bind it to loopback or a private network
(a compose/k8s internal network), never to a public interface.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import uuid
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor

import jinja2
import zmq

from pad_core.engine import PadEngine, without_zero_weights
from pad_core.cli_flags import add_settings_flags, settings_overrides
from pad_core.errors import ContextLengthExceededError, EngineError, InvalidRequestError, UnknownRewardModelError
from pad_core.ipc import HEARTBEAT_S, pack, unpack
from pad_core.memory import HeapTrimmer
from pad_core.model_loading import load_engine
from pad_core.settings import EngineSettings
from pad_core.tokenization import count_chat, tokenize, tokenizer_info
from pad_core.types import ChatRequest, GenerationRequest, GuidanceParams, TextRequest

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 100


class Worker:
    def __init__(self, engine: PadEngine, socket: zmq.Socket, parent_pid: int | None = None,
                 trimmer: HeapTrimmer | None = None):
        self.engine = engine
        self.parent_pid = parent_pid
        self.socket = socket
        self.owners: dict[str, bytes] = {}  # request id -> gateway identity
        self.gateways: set[bytes] = set()
        self.last_heartbeat = 0.0
        self.running = True
        # Stopping on a signal: new requests are refused, the ones taken are
        # finished, then the loop ends (a second signal ends it at once).
        self.stop_signals = 0  # counted by the signal handler; acted on by the loop
        self.draining = False
        # A fresh id per worker process: a gateway that sees it change knows
        # the worker restarted and its in-flight requests are gone.
        self.instance = uuid.uuid4().hex
        # Chats being tokenized: request id -> (gateway, future GenerationRequest).
        # One thread: tokenizations queue behind each other, never behind a step.
        self.preparing: dict[str, tuple[bytes, Future]] = {}
        # The PAD settings of each request not yet answered: its first output
        # says which values were used (GuidanceParams.resolved).
        self.unreported: dict[str, GuidanceParams] = {}
        # /tokenize and /detokenize asks in the tokenizer thread: token -> (gateway, future answer).
        self.tokenizing: dict[str, tuple[bytes, Future]] = {}
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pad-tokenize")
        # A finished tokenization wakes the loop's poll through this pipe.
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self.poller = zmq.Poller()
        self.poller.register(self.socket, zmq.POLLIN)
        self.poller.register(self._wake_read, zmq.POLLIN)
        # Freed tensors go back to the OS after work (pad_core/memory.py).
        self.trimmer = trimmer if trimmer is not None else HeapTrimmer()

    def send(self, identity: bytes, message: dict) -> None:
        self.socket.send_multipart([identity, pack(message)])

    def handle(self, identity: bytes, message: dict) -> None:
        kind = message["type"]
        self.gateways.add(identity)
        if kind == "hello":
            if self.draining:  # a gateway that came (back) while it stops
                self.send(identity, {"type": "stopping", "instance": self.instance})
                return
            self.send(identity, {"type": "ready", "info": self.model_info(), "stats": self.engine.stats(),
                                 "instance": self.instance})
        elif kind == "add":
            self.add(identity, message["request"])
        elif kind == "abort":
            preparing = self.preparing.pop(message["request_id"], None)
            if preparing is None:
                self.engine.abort(message["request_id"])
            else:  # still tokenizing: forget it (and skip the work if it has not started)
                preparing[1].cancel()
        elif kind == "load_adapter":
            self.load_adapter(identity, message)
        elif kind == "unload_adapter":
            self.unload_adapter(identity, message)
        elif kind == "tokenize":
            self.tokenize(identity, message)
        elif kind == "forget":  # a tokenize ask nobody waits for any more
            asked = self.tokenizing.pop(message["token"], None)
            if asked is not None:
                asked[1].cancel()
        else:
            logger.warning("ignoring unknown message type %r", kind)

    def model_info(self) -> dict:
        """The engine's model info, plus what the gateway checks requests against."""
        info = self.engine.model_info()
        return {**info, "vocab_size": len(self.engine.tokenizer),
                "tokenizer": tokenizer_info(self.engine.tokenizer, info["context_length"])}

    def add(self, identity: bytes, payload: dict) -> None:
        """Starts tokenizing a chat (or a raw-text prompt, "kind": "text") in
        the tokenizer thread; `collect` queues it."""
        request_id = payload.get("request_id", "?") if isinstance(payload, dict) else "?"
        if self.draining:  # a gateway that has not heard "stopping" yet
            self.send(identity, {"type": "rejected", "request_id": request_id, "error": {
                "message": "the worker is shutting down; retry shortly", "param": None,
                "code": "worker_unavailable", "status": 503}})
            return
        try:
            request = TextRequest.from_dict(payload) if payload.get("kind") == "text" else ChatRequest.from_dict(payload)
            if request.request_id in self.preparing:
                raise InvalidRequestError(f"request id {request.request_id!r} is already running", param="request_id")
        except Exception as exc:
            self.reject(identity, request_id, exc)
            return
        future = self._tokenizer_thread.submit(self.prepare, request)
        self.preparing[request.request_id] = (identity, future)
        future.add_done_callback(self._wake)

    def prepare(self, request: ChatRequest | TextRequest) -> GenerationRequest:
        """Validates and tokenizes a request (in the tokenizer thread)."""
        if isinstance(request, TextRequest):
            generation = prepare_text(self.engine, request)
        else:
            generation = self.engine.prepare_chat(request)
        check_token_ids(generation, len(self.engine.tokenizer))
        return generation

    def _wake(self, _future: Future) -> None:
        try:
            os.write(self._wake_write, b"\0")
        except (BlockingIOError, OSError):  # the pipe is full (already awake) or closed (stopping)
            pass

    def tokenize(self, identity: bytes, message: dict) -> None:
        """Starts a /tokenize or /detokenize ask in the tokenizer thread (a
        huge prompt must not stall the decode loop); `collect` answers it."""
        request = message["request"]
        if isinstance(request, dict) and request.get("kind") == "count_chat":
            future = self._tokenizer_thread.submit(count_chat, self.engine, request)
        else:
            future = self._tokenizer_thread.submit(tokenize, self.engine.prompts, request)
        self.tokenizing[message["token"]] = (identity, future)
        future.add_done_callback(self._wake)

    def answer_tokenizations(self) -> None:
        for token, (identity, future) in list(self.tokenizing.items()):
            if not future.done():
                continue
            del self.tokenizing[token]
            try:
                self.send(identity, {"type": "tokenized", "token": token, "result": future.result()})
            except Exception as exc:
                self.send(identity, {"type": "tokenize_failed", "token": token, "error": refusal(exc, token)})

    def collect(self) -> None:
        """Queues in the engine the chats whose tokenization finished (in
        arrival order), and answers those refused with "rejected"."""
        self.answer_tokenizations()
        for request_id, (identity, future) in list(self.preparing.items()):
            if not future.done():
                break
            del self.preparing[request_id]
            try:
                generation = future.result()
                self.engine.add_request(generation)
            except Exception as exc:
                self.reject(identity, request_id, exc)
                continue
            self.owners[request_id] = identity
            self.unreported[request_id] = generation.guidance

    def reject(self, identity: bytes, request_id: str, exc: Exception) -> None:
        """Answers a request the engine will not take: its own fault (400),
        or the engine's (500, logged). Never stops the loop."""
        self.send(identity, {"type": "rejected", "request_id": request_id, "error": refusal(exc, request_id)})

    def load_adapter(self, identity: bytes, message: dict) -> None:
        try:
            self.engine.add_reward_adapter(message["name"], message["path"])
        except Exception as exc:  # a bad adapter is answered, never fatal
            if not isinstance(exc, EngineError):
                logger.exception("could not load adapter %r", message.get("name"))
            error = refusal(exc, message.get("name")) if isinstance(exc, InvalidRequestError) else {
                "message": str(exc), "param": "path", "code": "invalid_adapter"}
            self.send(identity, {"type": "adapter_failed", "token": message["token"], "error": error})
            return
        self.send(identity, {"type": "adapter_loaded", "token": message["token"], "info": self.model_info()})
        self.announce_model_info(identity)

    def unload_adapter(self, identity: bytes, message: dict) -> None:
        try:
            in_use = self.engine.remove_reward_adapter(message["name"])
        except Exception as exc:
            self.send(identity, {"type": "adapter_failed", "token": message["token"],
                                 "error": refusal(exc, message.get("name"))})
            return
        self.send(identity, {"type": "adapter_unloaded", "token": message["token"], "info": self.model_info(),
                             "in_use": in_use})
        self.announce_model_info(identity)

    def announce_model_info(self, changed_by: bytes) -> None:
        """Tells the other gateways of this worker its reward models changed."""
        info = self.model_info()
        for identity in self.gateways - {changed_by}:
            self.send(identity, {"type": "model_info", "info": info})

    def drain(self, timeout_ms: int) -> None:
        """Handles every waiting message, waiting up to timeout_ms for the
        first one (or for a tokenization to finish)."""
        if timeout_ms:
            self.poller.poll(timeout_ms)
            timeout_ms = 0
        while True:
            try:
                if not os.read(self._wake_read, 4096):
                    break
            except BlockingIOError:
                break
        while self.socket.poll(timeout_ms):
            frames = self.socket.recv_multipart()
            try:
                if len(frames) != 2:
                    raise ValueError(f"expected 2 frames, got {len(frames)}")
                identity, frame = frames
                message = unpack(frame)
            except ValueError:
                logger.warning("dropping a malformed message")
                continue
            finally:
                timeout_ms = 0
            try:
                self.handle(identity, message)
            except Exception:  # a bad message must never stop the worker
                logger.exception("could not handle a %r message", message.get("type"))

    def step(self) -> None:
        outputs = self.engine.step()
        by_gateway = defaultdict(list)
        for output in outputs:
            owner = self.owners.get(output.request_id)
            guidance = self.unreported.pop(output.request_id, None)
            if guidance is not None:
                source = self.engine.reward_sources.get(guidance.reward_model)
                output.guidance = guidance.resolved(self.engine.settings.guidance_defaults(),
                                                    None if source is None else source.base_sees_preference)
            if output.finished:
                self.owners.pop(output.request_id, None)
            if owner is not None:
                by_gateway[owner].append(output.to_dict())
        stats = self.engine.stats()
        for identity, items in by_gateway.items():
            self.send(identity, {"type": "outputs", "outputs": items, "stats": stats})

    def heartbeat(self) -> None:
        now = time.monotonic()
        if now - self.last_heartbeat >= HEARTBEAT_S:
            self.last_heartbeat = now
            stats = self.engine.stats()
            for identity in self.gateways:
                self.send(identity, {"type": "stats", "stats": stats, "instance": self.instance})

    def stop(self) -> None:
        """A stop signal (safe in a signal handler or another thread: it only
        counts). The loop acts on it: the first drains (the gateways hear
        "stopping" and send no more; the requests taken are finished), the
        second stops at once."""
        self.stop_signals += 1

    def _begin_draining(self) -> None:
        self.draining = True
        logger.info("stopping: finishing %d requests (a second signal stops at once)",
                    len(self.owners) + len(self.preparing))
        self.broadcast({"type": "stopping", "instance": self.instance})

    def broadcast(self, message: dict) -> None:
        for identity in self.gateways:
            self.send(identity, message)

    def serve_forever(self) -> None:
        while self.running:
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                logger.warning("the gateway that spawned this worker is gone; exiting")
                break
            if self.stop_signals >= 2:
                break
            if self.stop_signals and not self.draining:
                self._begin_draining()
            if self.draining and not self.engine.has_unfinished() and not self.preparing:
                break
            self.drain(0 if self.engine.has_unfinished() else IDLE_POLL_MS)
            self.collect()
            worked = self.engine.has_unfinished()
            if worked:
                self.step()
            self.heartbeat()
            self.trimmer.after_iteration(worked, idle=not self.engine.has_unfinished() and not self.preparing)
        # The gateways fail what is left at once, instead of waiting out the heartbeat's timeout.
        self.broadcast({"type": "stopped", "instance": self.instance})
        self.close()

    def close(self) -> None:
        """Stops the tokenizer thread (chats still waiting for it are dropped)."""
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)
        self.poller.unregister(self._wake_read)
        for fd in (self._wake_read, self._wake_write):
            os.close(fd)


def refusal(exc: Exception, request_id: str) -> dict:
    """The error a refused request is answered with: its own fault (400),
    or the engine's (500, logged)."""
    if isinstance(exc, InvalidRequestError):
        return {"message": exc.message, "param": exc.param, "code": exc.code}
    if isinstance(exc, jinja2.TemplateError):  # the template's own checks (roles must alternate, ...)
        return {"message": f"the model's chat template refused these messages: {exc}", "param": "messages",
                "code": "invalid_messages"}
    if isinstance(exc, TypeError | KeyError | ValueError | AttributeError):
        return {"message": f"malformed request: {exc}", "param": None, "code": None}
    logger.error("could not take request %s", request_id, exc_info=exc)
    return {"message": f"the engine could not take this request: {exc}", "param": None, "code": "engine_error",
            "status": 500}


def check_token_ids(request: GenerationRequest, vocab_size: int) -> None:
    """logit_bias and allowed_token_ids name tokens of the vocabulary."""
    for token, _ in request.sampling.logit_bias:
        if not 0 <= token < vocab_size:
            raise InvalidRequestError(f"logit_bias: token id {token} is not in [0, {vocab_size})", param="logit_bias")
    for token in request.sampling.allowed_token_ids:
        if not 0 <= token < vocab_size:
            raise InvalidRequestError(f"allowed_token_ids: token id {token} is not in [0, {vocab_size})",
                                      param="allowed_token_ids")


def prepare_text(engine: PadEngine, request: TextRequest) -> GenerationRequest:
    """A raw-text prompt (no chat template) as a GenerationRequest: what
    PadEngine.prepare_chat does for a chat. Raises InvalidRequestError."""
    request.verify(engine.limits)
    request = without_zero_weights(request)
    sources = engine.reward_sources
    name = request.guidance.reward_model
    if name not in sources:
        raise UnknownRewardModelError(name, list(sources))
    # The cheap bound before tokenizing (as prepare_chat): a token covers at most max_token_chars.
    longest = request.text_length()
    at_least = -(-longest // engine.max_token_chars)
    if at_least >= engine.context_length and request.sampling.truncate_prompt_tokens is None:
        raise ContextLengthExceededError(
            f"the prompt has {longest} characters, at least {at_least} tokens; "
            f"the model's context length is {engine.context_length}", param="prompt")
    sees = request.guidance.base_sees_preference
    if sees is None:
        sees = sources[name].base_sees_preference
    if request.structured is not None:
        engine.structured.compile(request.structured)  # off the decode loop, as prepare_chat does
    prompt_ids, reward_ids = engine.prompts.encode_text(request.prompt, request.preferences, sees,
                                                        request.add_special_tokens)
    return engine.generation_request(request, prompt_ids, reward_ids, request.structured)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pad_core.worker", description=__doc__)
    parser.add_argument("--bind", default=os.environ.get("PAD_WORKER_BIND", "tcp://0.0.0.0:5557"))
    parser.add_argument("--log-level", default=os.environ.get("PAD_LOG_LEVEL", "INFO"))
    parser.add_argument("--parent-pid", type=int, help="exit when this process (the spawning gateway) is gone")
    add_settings_flags(parser.add_argument_group("model and decoding"), EngineSettings)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        overrides = settings_overrides(args, EngineSettings)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s worker %(name)s: %(message)s")
    settings = EngineSettings(**overrides)
    engine = load_engine(settings)
    context = zmq.Context()
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    # A gateway that vanished must not block the loop: drop what cannot be sent.
    socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
    socket.bind(args.bind)
    logger.info("worker ready on %s serving %s", args.bind, settings.resolved_served_name())
    worker = Worker(engine, socket, args.parent_pid)

    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    signal.signal(signal.SIGINT, lambda *_: worker.stop())
    worker.serve_forever()
    socket.close()
    context.term()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
