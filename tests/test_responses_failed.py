"""A Responses stream whose request fails mid-answer ends as OpenAI's does:
an `error` event, then the terminal `response.failed` (status "failed",
`error` set), so a client waiting for a terminal event gets one."""

from __future__ import annotations

import json

import httpx
from server_helpers import uvicorn_server, worker_thread

from pad_core.testing import tiny_engine
from server.app import create_app
from server.settings import ServerSettings


def test_a_failed_stream_ends_with_response_failed(tmp_path):
    engine = tiny_engine()
    choose = engine._choose

    def failing(states, hidden):  # a bug the request reaches after two tokens
        if any(len(state.generated) == 2 for state in states):
            raise RuntimeError("injected fault")
        return choose(states, hidden)

    engine._choose = failing
    with worker_thread(engine=engine) as (address, _):
        with uvicorn_server(create_app(ServerSettings(worker_address=address, data_dir=tmp_path))) as url:
            with httpx.stream("POST", f"{url}/v1/responses", timeout=30, json={
                    "model": "smollm2-135m-instruct", "input": "How do I sleep better?", "stream": True,
                    "max_output_tokens": 8}) as response:
                events = [json.loads(line[len("data: "):]) for line in response.iter_lines()
                          if line.startswith("data: ")]
    kinds = [event["type"] for event in events]
    assert kinds[0] == "response.created" and kinds[-2:] == ["error", "response.failed"], kinds
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and "injected fault" in failed["error"]["message"]
    assert failed["error"]["code"] == events[-2]["code"]
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
