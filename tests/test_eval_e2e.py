"""`pad eval` end to end on the tiny model: the openai SDK -> an
OpenAI-compatible endpoint -> PadEngine, 3 cases, max_tokens 8.

The endpoint is a minimal in-test shim over the engine (non-streaming chat
completions, continuous batching by stepping the engine between requests),
reached in-process through httpx's ASGI transport: it checks the eval's
requests against the engine's semantics (preference, pad.weight/top_k/
base_sees_preference) without sockets or the gateway process."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fastapi import FastAPI
from openai import AsyncOpenAI

from pad_core.types import ChatRequest, GuidanceParams, Preference, SamplingParams
from server.tools.eval import DEFAULT_DATASET, main


class EngineShim:
    """Requests join the engine between steps; one driver task steps it."""

    def __init__(self, engine):
        self.engine = engine
        self.pending: list[ChatRequest] = []
        self.futures: dict[str, asyncio.Future] = {}
        self.parts: dict[str, list[str]] = {}
        self.driver: asyncio.Task | None = None
        self.counter = 0

    async def complete(self, chat: ChatRequest):
        self.futures[chat.request_id] = asyncio.get_running_loop().create_future()
        self.parts[chat.request_id] = []
        self.pending.append(chat)
        if self.driver is None or self.driver.done():
            self.driver = asyncio.create_task(self.drive())
        return await self.futures[chat.request_id]

    async def drive(self):
        while self.pending or self.engine.has_unfinished():
            while self.pending:
                self.engine.add_chat(self.pending.pop())
            for out in await asyncio.to_thread(self.engine.step):
                self.parts[out.request_id].append(out.text)
                if out.finished:
                    self.futures.pop(out.request_id).set_result((out, "".join(self.parts.pop(out.request_id))))
            await asyncio.sleep(0)


def shim_app(engine, seen: list[dict]) -> FastAPI:
    app = FastAPI()
    shim = EngineShim(engine)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "tiny", "object": "model", "created": 0, "owned_by": "test"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        seen.append(body)
        preference = body.get("preference")
        preferences = [] if preference is None else (
            [Preference(preference)] if isinstance(preference, str) else [Preference(**p) for p in preference])
        shim.counter += 1
        request = ChatRequest(
            f"r{shim.counter}", body["messages"], preferences,
            SamplingParams(max_tokens=body["max_tokens"], temperature=body["temperature"], top_p=body["top_p"], seed=body.get("seed")),
            GuidanceParams(**(body.get("pad") or {})),
        )
        out, text = await shim.complete(request)
        return {
            "id": request.request_id, "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": out.finish_reason}],
            "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                      "total_tokens": out.prompt_tokens + out.completion_tokens},
        }

    return app


@pytest.fixture
def tiny_endpoint(make_engine, monkeypatch):
    """Every AsyncOpenAI the eval builds talks to the shim over the tiny engine."""
    seen: list[dict] = []
    app = shim_app(make_engine(), seen)
    real = AsyncOpenAI.__init__

    def patched(self, *args, **kwargs):
        kwargs["http_client"] = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
        real(self, *args, **kwargs)

    monkeypatch.setattr(AsyncOpenAI, "__init__", patched)
    return seen


def test_eval_end_to_end_on_the_tiny_model(tiny_endpoint, tmp_path):
    out = tmp_path / "eval"
    code = main([str(DEFAULT_DATASET), "--base-url", "http://tiny/v1", "--ids", "bullets-01,fr-01,emoji-01",
                 "--modes", "base,prompt,pad", "--weights", "0,1,4", "--top-k", "5", "--max-tokens", "8",
                 "--concurrency", "4", "--out", str(out), "--no-progress"])
    assert code == 0
    payload = json.loads((out / "answers.json").read_text())
    modes = ["base", "prompt", "pad w=0 k=5", "pad w=1 k=5", "pad w=4 k=5"]
    assert payload["settings"]["modes"] == modes and payload["settings"]["decoding"]["model"] == "tiny"
    answers = {(a["mode"], a["case_id"]): a for a in payload["answers"]}
    assert len(answers) == 15 and all(a["error"] is None for a in answers.values())
    assert all(a["completion_tokens"] <= 8 and a["text"] for a in answers.values())
    for case in ("bullets-01", "fr-01", "emoji-01"):
        # w = 0 is exactly plain decoding; the prompt mode changes the context.
        assert answers[("pad w=0 k=5", case)]["text"] == answers[("base", case)]["text"]
    assert len(tiny_endpoint) == 15
    assert sum("preference" in body for body in tiny_endpoint) == 9
    assert {json.dumps(b.get("pad"), sort_keys=True) for b in tiny_endpoint if "preference" in b} == {
        json.dumps({"top_k": 5, "weight": w}, sort_keys=True) for w in (0.0, 1.0, 4.0)}
    summary = payload["summary"]
    assert set(summary["modes"]) == set(modes) and summary["types"] == ["bullets", "emoji", "french"]
    assert all(summary["modes"][m]["overall"]["n"] == 3 for m in modes)
    assert "| **overall** | 3 |" in (out / "report.md").read_text()
    assert (out / "chart.png").read_bytes()[:4] == b"\x89PNG"


def test_grid_end_to_end_on_the_tiny_model(tiny_endpoint, tmp_path):
    out = tmp_path / "grid"
    code = main([str(DEFAULT_DATASET), "--base-url", "http://tiny/v1", "--ids", "brief-02,casual-02",
                 "--grid", "--grid-weights", "1,2", "--grid-top-k", "5", "--grid-base-sees-preference", "false,true",
                 "--max-tokens", "6", "--out", str(out), "--no-progress"])
    assert code == 0
    grid = json.loads((out / "answers.json").read_text())["grid"]
    assert len(grid["rows"]) == 3 and grid["best"] in {r["mode"] for r in grid["rows"] if r["eligible"]} | {None}
    assert "PAD settings grid" in (out / "report.md").read_text()
