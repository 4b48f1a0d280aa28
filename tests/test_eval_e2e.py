"""`pad eval` and `pad bench` end to end on the tiny model: the openai SDK
-> the real gateway (create_app, in-process through httpx's ASGI transport)
-> a worker thread over ZeroMQ -> PadEngine. A few cases, a few tokens."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from openai import AsyncOpenAI

from server.tools import bench as bench_tool
from server.tools import eval as eval_tool
from server_helpers import worker_thread


@pytest.fixture
async def gateway(tmp_path, monkeypatch):
    """The gateway on the tiny engine; every AsyncOpenAI the tools build talks
    to it in-process. Yields the request bodies it received."""
    from server.app import create_app
    from server.settings import ServerSettings

    seen: list[dict] = []

    async def record(request: httpx.Request) -> None:
        if request.url.path.endswith("/chat/completions"):
            seen.append(json.loads(request.content))

    with worker_thread() as (address, _worker):
        app = create_app(ServerSettings(worker_address=address, data_dir=tmp_path))
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://pad.test") as http:
                deadline = time.monotonic() + 60
                while (await http.get("/health")).status_code != 200:
                    assert time.monotonic() < deadline, "the gateway never became healthy"
                    await asyncio.sleep(0.05)
            real = AsyncOpenAI.__init__

            def patched(self, *args, **kwargs):
                kwargs["http_client"] = httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                                          event_hooks={"request": [record]})
                real(self, *args, **kwargs)

            monkeypatch.setattr(AsyncOpenAI, "__init__", patched)
            yield seen


async def test_eval_end_to_end_on_the_tiny_model(gateway, tmp_path):
    out = tmp_path / "eval"
    args = eval_tool.parse_args([
        str(eval_tool.DEFAULT_DATASET), "--ids", "bullets-01,fr-01,emoji-01", "--modes", "base,prompt,pad",
        "--weights", "0,1,4", "--top-k", "5", "--max-tokens", "8", "--concurrency", "4", "--out", str(out), "--no-progress",
        "--no-coherence",
    ])
    assert await eval_tool.evaluate(args, "http://pad.test/v1") == 0
    payload = json.loads((out / "answers.json").read_text())
    modes = ["base", "prompt", "pad w=0 k=5", "pad w=1 k=5", "pad w=4 k=5"]
    assert payload["settings"]["modes"] == modes
    assert payload["settings"]["decoding"]["model"] == "smollm2-135m-instruct"  # from GET /v1/models
    answers = {(a["mode"], a["case_id"]): a for a in payload["answers"]}
    assert len(answers) == 15 and all(a["error"] is None for a in answers.values())
    assert all(0 < a["completion_tokens"] <= 8 for a in answers.values())
    for case in ("bullets-01", "fr-01", "emoji-01"):
        # w = 0 is exactly plain decoding; PAD and prompting change the answer.
        assert answers[("pad w=0 k=5", case)]["text"] == answers[("base", case)]["text"]
        assert answers[("pad w=4 k=5", case)]["text"] != answers[("base", case)]["text"]
    assert len(gateway) == 15 and sum("preference" in body for body in gateway) == 9
    assert {json.dumps(b.get("pad"), sort_keys=True) for b in gateway if "preference" in b} == {
        json.dumps({"top_k": 5, "weight": w}, sort_keys=True) for w in (0.0, 1.0, 4.0)}
    assert all(b["temperature"] == 0 and b["max_tokens"] == 8 and b["seed"] == 0 for b in gateway)
    summary = payload["summary"]
    assert set(summary["modes"]) == set(modes) and summary["types"] == ["bullets", "emoji", "french"]
    assert all(summary["modes"][m][rate]["overall"]["n"] == 3 for m in modes for rate in ("gated", "gate", "satisfaction"))
    # Random weights write gibberish: the gate fails it, whatever the checks say.
    assert all(a["gate"] is not None and not a["gate"]["passed"] for a in payload["answers"])
    assert all(summary["modes"][m]["gated"]["overall"]["rate"] == 0 for m in modes)
    assert "| **overall** | 3 |" in (out / "report.md").read_text()
    assert (out / "chart.png").read_bytes()[:4] == b"\x89PNG"


async def test_grid_end_to_end_on_the_tiny_model(gateway, tmp_path):
    out = tmp_path / "grid"
    args = eval_tool.parse_args([
        str(eval_tool.DEFAULT_DATASET), "--ids", "brief-02,casual-02", "--grid", "--grid-weights", "1,2",
        "--grid-top-k", "5", "--grid-base-sees-preference", "false,true", "--max-tokens", "6", "--out", str(out),
        "--no-progress", "--no-coherence",
    ])
    assert await eval_tool.evaluate(args, "http://pad.test/v1") == 0
    payload = json.loads((out / "answers.json").read_text())
    grid = payload["grid"]
    assert [r["mode"] for r in grid["rows"]] == ["pad w=1 k=5 bsp=0", "pad w=2 k=5 bsp=0", "pad w=1 k=5 bsp=1"]
    assert grid["best"] in {r["mode"] for r in grid["rows"] if r["eligible"]} | {None}
    assert "PAD settings grid" in (out / "report.md").read_text()


async def test_bench_end_to_end_on_the_tiny_model(gateway, tmp_path):
    out = tmp_path / "bench"
    args = bench_tool.parse_args(["--concurrency", "1,3", "--requests", "3", "--max-tokens", "6", "--warmup", "1",
                                  "--pad-preferences", "1,2", "--out", str(out)])
    assert await bench_tool.bench(args, "http://pad.test/v1") == 0
    payload = json.loads((out / "bench.json").read_text())
    levels = payload["levels"]
    assert [(lv["mode"], lv["concurrency"]) for lv in levels] == [
        (mode, c) for c in (1, 3) for mode in ("plain", "pad x1", "pad x2")]
    for lv in levels:
        assert lv["errors"] == 0 and lv["requests"] == 3
        assert 0 < lv["completion_tokens"] <= 18 and lv["tokens_per_s"] > 0
        assert lv["ttft_ms"]["p50"] > 0
    assert len(payload["ratios"]) == 4
    two = [b for b in gateway if isinstance(b.get("preference"), list)]
    assert two and all(len(b["preference"]) == 2 and b["stream"] for b in two)
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.integration
def test_eval_starts_its_own_server_on_the_embedded_model(tmp_path, monkeypatch):
    """No --base-url: `pad eval` starts `pad serve` (embedded model) on a free
    port, runs, and stops it."""
    monkeypatch.setenv("PAD_DTYPE", "float32")
    out = tmp_path / "eval"
    code = eval_tool.main(["--types", "brevity,bullets", "--limit", "1", "--modes", "base,pad", "--weights", "1",
                           "--max-tokens", "8", "--out", str(out), "--no-progress"])
    assert code == 0
    payload = json.loads((out / "answers.json").read_text())
    assert payload["settings"]["base_url"].startswith("http://127.0.0.1:")
    assert payload["settings"]["decoding"]["model"] == "smollm2-135m-instruct"
    assert len(payload["answers"]) == 4 and all(a["text"] and a["error"] is None for a in payload["answers"])
    # Coherence was scored in-process with the embedded model; without a `prompt` mode the floor comes from
    # the first mode (base).
    assert isinstance(payload["settings"]["coherence_floor"], float)
    assert all(a["gate"]["coherence_logprob"] is not None for a in payload["answers"])
