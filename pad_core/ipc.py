"""Gateway <-> worker wire protocol: msgpack frames over ZeroMQ.

The worker binds a ROUTER socket (`tcp://0.0.0.0:5557`, or a local port the
gateway picks); each gateway connects a DEALER. TCP works across hosts and
containers. No torch here: the gateway imports this module too.

Gateway -> worker:  {"type": "hello"}
                    {"type": "add", "request": ChatRequest.to_dict()}
                    {"type": "abort", "request_id": str}
                    {"type": "load_adapter", "name": str, "path": str, "token": str}
Worker -> gateway:  {"type": "ready", "info": model_info, "stats": stats}
                    {"type": "outputs", "outputs": [StepOutput.to_dict()...], "stats": stats}
                    {"type": "rejected", "request_id": str, "error": {message, param, code}}
                    {"type": "stats", "stats": stats}          (heartbeat, every HEARTBEAT_S)
                    {"type": "adapter_loaded" | "adapter_failed", "token": str, "info" | "error": ...}
"""

from __future__ import annotations

from typing import Any

import msgpack

HEARTBEAT_S = 0.5


def pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(frame: bytes) -> dict[str, Any]:
    message = msgpack.unpackb(frame, raw=False)
    if not isinstance(message, dict) or "type" not in message:
        raise ValueError("malformed IPC message")
    return message
