"""The worker process: the engine behind a ZeroMQ ROUTER socket.

    python -m pad_core.worker --bind tcp://0.0.0.0:5557      (settings from PAD_*)

Loop: take every waiting message (without blocking while requests run),
run one engine step, send each gateway the outputs of its requests. A bad
request is answered with "rejected" and never stops the loop.

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

import zmq

from pad_core.engine import PadEngine
from pad_core.errors import EngineError, InvalidRequestError
from pad_core.ipc import HEARTBEAT_S, pack, unpack
from pad_core.settings import EngineSettings
from pad_core.types import ChatRequest

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 100


class Worker:
    def __init__(self, engine: PadEngine, socket: zmq.Socket, parent_pid: int | None = None):
        self.engine = engine
        self.parent_pid = parent_pid
        self.socket = socket
        self.owners: dict[str, bytes] = {}  # request id -> gateway identity
        self.gateways: set[bytes] = set()
        self.last_heartbeat = 0.0
        self.running = True
        # A fresh id per worker process: a gateway that sees it change knows
        # the worker restarted and its in-flight requests are gone.
        self.instance = uuid.uuid4().hex

    def send(self, identity: bytes, message: dict) -> None:
        self.socket.send_multipart([identity, pack(message)])

    def handle(self, identity: bytes, message: dict) -> None:
        kind = message["type"]
        self.gateways.add(identity)
        if kind == "hello":
            self.send(identity, {"type": "ready", "info": self.engine.model_info(), "stats": self.engine.stats(),
                                 "instance": self.instance})
        elif kind == "add":
            self.add(identity, message["request"])
        elif kind == "abort":
            self.engine.abort(message["request_id"])
        elif kind == "load_adapter":
            self.load_adapter(identity, message)
        else:
            logger.warning("ignoring unknown message type %r", kind)

    def add(self, identity: bytes, payload: dict) -> None:
        request_id = payload.get("request_id", "?")
        try:
            self.engine.add_chat(ChatRequest.from_dict(payload))
        except InvalidRequestError as exc:
            error = {"message": exc.message, "param": exc.param, "code": exc.code}
            self.send(identity, {"type": "rejected", "request_id": request_id, "error": error})
            return
        except (TypeError, KeyError, ValueError) as exc:
            error = {"message": f"malformed request: {exc}", "param": None, "code": None}
            self.send(identity, {"type": "rejected", "request_id": request_id, "error": error})
            return
        except Exception as exc:  # one request must never stop the worker
            logger.exception("could not add request %s", request_id)
            error = {"message": f"the engine could not take this request: {exc}", "param": None,
                     "code": "engine_error", "status": 500}
            self.send(identity, {"type": "rejected", "request_id": request_id, "error": error})
            return
        self.owners[request_id] = identity

    def load_adapter(self, identity: bytes, message: dict) -> None:
        try:
            self.engine.add_reward_adapter(message["name"], message["path"])
        except Exception as exc:  # a bad adapter is answered, never fatal
            if not isinstance(exc, EngineError):
                logger.exception("could not load adapter %r", message.get("name"))
            self.send(identity, {"type": "adapter_failed", "token": message["token"], "error": str(exc)})
            return
        self.send(identity, {"type": "adapter_loaded", "token": message["token"], "info": self.engine.model_info()})

    def drain(self, timeout_ms: int) -> None:
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

    def serve_forever(self) -> None:
        while self.running:
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                logger.warning("the gateway that spawned this worker is gone; exiting")
                break
            self.drain(0 if self.engine.has_unfinished() else IDLE_POLL_MS)
            if self.engine.has_unfinished():
                self.step()
            self.heartbeat()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pad_core.worker", description=__doc__)
    parser.add_argument("--bind", default=os.environ.get("PAD_WORKER_BIND", "tcp://0.0.0.0:5557"))
    parser.add_argument("--log-level", default=os.environ.get("PAD_LOG_LEVEL", "INFO"))
    parser.add_argument("--parent-pid", type=int, help="exit when this process (the spawning gateway) is gone")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s worker %(name)s: %(message)s")
    settings = EngineSettings()
    engine = PadEngine.from_settings(settings)
    context = zmq.Context()
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    # A gateway that vanished must not block the loop: drop what cannot be sent.
    socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
    socket.bind(args.bind)
    logger.info("worker ready on %s serving %s", args.bind, settings.resolved_served_name())
    worker = Worker(engine, socket, args.parent_pid)

    def stop(*_):
        worker.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worker.serve_forever()
    socket.close()
    context.term()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
