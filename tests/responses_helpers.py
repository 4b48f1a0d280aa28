"""What the tests of the keyed APIs share (tests/test_stored_responses.py,
tests/test_conversations.py, the Anthropic and input-token tests...):
greedy short answers from the tiny engine, a function tool in the Responses
shape, a test server with API keys bound to users (on a worker of its own,
or given one), the official SDK on it with a key, and an SDK error's OpenAI
error body."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import openai
from server_helpers import uvicorn_server, worker_thread

from server.app import create_app
from server.settings import ServerSettings

MODEL = "smollm2-135m-instruct"
GREEDY = {"model": MODEL, "temperature": 0, "max_output_tokens": 6}
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                          "required": ["city"], "additionalProperties": False}}


KEYS = ["admin", "ka:alice", "kb:bob"]  # an unbound key, and keys bound to alice and to bob


@contextlib.contextmanager
def keyed_server(worker: str, data_dir: Path) -> Iterator[str]:
    """A gateway on `worker` with the KEYS, keeping its store in `data_dir`; yields its URL."""
    settings = ServerSettings(worker_address=worker, data_dir=data_dir, api_keys=KEYS)
    with uvicorn_server(create_app(settings)) as url:
        yield url


@contextlib.contextmanager
def keyed_gateway(data_dir: Path) -> Iterator[str]:
    """A worker loop on the tiny engine and a keyed_server in front of it; yields its URL."""
    with worker_thread() as (address, _worker), keyed_server(address, data_dir) as url:
        yield url


def sdk(server: str, key: str = "admin") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0)


def error_of(excinfo) -> dict:
    """The error body of a pytest.raises(openai.APIStatusError) (the SDK
    keeps either the whole body or its "error")."""
    return excinfo.value.body if "message" in excinfo.value.body else excinfo.value.body["error"]


def wait_for(client: openai.OpenAI, response_id: str, statuses: tuple[str, ...], timeout_s: float = 60.0):
    """The kept response once its status is one of `statuses` (a background one, polled)."""
    deadline = time.monotonic() + timeout_s
    while (got := client.responses.retrieve(response_id)).status not in statuses:
        assert time.monotonic() < deadline, f"still {got.status}"
        time.sleep(0.05)
    return got
