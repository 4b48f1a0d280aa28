"""Gateway <-> worker wire protocol: msgpack frames over ZeroMQ.

The worker binds a ROUTER socket (`tcp://0.0.0.0:5557`, or a local port the
gateway picks); each gateway connects a DEALER. TCP works across hosts and
containers. No torch here: the gateway imports this module too.

Gateway -> worker:  {"type": "hello"}
                    {"type": "add", "request": ChatRequest.to_dict()}
                    {"type": "abort", "request_id": str}
                    {"type": "load_adapter", "name": str, "path": str, "token": str}
                    {"type": "unload_adapter", "name": str, "token": str}
Worker -> gateway:  {"type": "ready", "info": model_info, "stats": stats, "instance": str}
                    {"type": "outputs", "outputs": [StepOutput.to_dict()...], "stats": stats}
                    {"type": "rejected", "request_id": str, "error": {message, param, code[, status]}}
                    {"type": "stats", "stats": stats, "instance": str}   (heartbeat, every HEARTBEAT_S)
                    {"type": "adapter_loaded" | "adapter_failed", "token": str, "info" | "error": ...}
                    {"type": "adapter_unloaded", "token": str, "info": model_info, "in_use": int}
                    {"type": "model_info", "info": model_info}   (to the other gateways, after a change)
                    {"type": "stopping", "instance": str}   (a stop signal: send no more; the requests
                                                            taken are finished)
                    {"type": "stopped", "instance": str}    (the loop ended: what is left is lost)

`instance` is a fresh id per worker process: a gateway that sees it change
(a remote worker restarted at the same address) fails its in-flight
requests at once instead of waiting for outputs that will never come. A
rejection without `status` is an invalid request (400); `status: 500` is
the engine failing on it. The gateway says "hello" whenever it has not
heard from the worker for a while, so a restarted worker learns about it.
"""

from __future__ import annotations

from typing import Any

import msgpack

HEARTBEAT_S = 0.5


def pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(frame: bytes) -> dict[str, Any]:
    """The message in one frame; ValueError for anything that is not one."""
    try:
        message = msgpack.unpackb(frame, raw=False)
    except Exception as exc:  # msgpack raises several kinds on garbage
        raise ValueError(f"malformed IPC message: {exc}") from exc
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ValueError("malformed IPC message")  # noqa: TRY004 - one error type for callers
    return message
