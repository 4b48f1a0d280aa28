"""`pad bench`'s client side against a fake streaming endpoint: metrics,
ratios, outputs. No model, no server."""

from __future__ import annotations

import json

import httpx
import pytest
from openai import AsyncOpenAI

from server.tools.bench import RequestResult, bench_modes, main, ratio_rows, summarize_level


def sse_endpoint(bodies: list[dict]):
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [{"id": "fake", "object": "model", "created": 0, "owned_by": "x"}]})
        body = json.loads(request.content)
        bodies.append(body)
        if body["messages"][0]["content"].startswith("Why do cats"):
            return httpx.Response(503, json={"error": {"message": "busy", "type": "server_error", "param": None, "code": None}})
        n = body["max_tokens"] if body.get("ignore_eos") else 3
        chunks = []
        base = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "fake"}
        for i in range(n):
            chunks.append({**base, "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}]})
        chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        chunks.append({**base, "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}})
        text = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, content=text.encode(), headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(handler)


def test_modes_and_bodies():
    plain, one = bench_modes(["a", "b"], [1], 2.0, None)
    assert plain.extra_body(False) == {} and plain.extra_body(True) == {"ignore_eos": True}
    assert one.name == "pad" and one.extra_body(False) == {"preference": "a", "pad": {"weight": 2.0}}
    modes = bench_modes(["a", "b"], [1, 2], None, 5)
    assert [m.name for m in modes] == ["plain", "pad x1", "pad x2"]
    assert modes[2].extra_body(False)["preference"] == [{"text": "a", "weight": 1.0}, {"text": "b", "weight": 1.0}]
    with pytest.raises(ValueError):
        bench_modes(["a"], [2], None, None)


def test_summarize_level_and_ratios():
    results = [
        RequestResult(True, 0.0, 1.0, ttft=0.2, gaps=[0.1, 0.3], tokens=3),
        RequestResult(True, 0.0, 2.0, ttft=0.4, gaps=[0.2], tokens=2),
        RequestResult(False, 0.0, 0.1, error="boom"),
    ]
    lv = summarize_level("plain", 2, results, seconds=2.0)
    assert (lv.requests, lv.errors, lv.completion_tokens) == (3, 1, 5)
    assert lv.requests_per_s == 1.0 and lv.tokens_per_s == 2.5
    assert lv.ttft_ms["p50"] == pytest.approx(300) and lv.itl_ms["p50"] == pytest.approx(200)
    assert lv.tpot_ms == pytest.approx(1000 * (0.4 + 1.6) / 2) and lv.error_samples == ["boom"]
    pad = summarize_level("pad", 2, results[:1], seconds=2.0)
    (row,) = ratio_rows([lv, pad])
    assert row["mode"] == "pad" and row["tokens_per_s"] == pytest.approx(1.5 / 2.5)


def test_cli_on_a_fake_endpoint(tmp_path, monkeypatch):
    bodies: list[dict] = []
    transport = sse_endpoint(bodies)
    real = AsyncOpenAI.__init__

    def patched(self, *args, **kwargs):
        kwargs["http_client"] = httpx.AsyncClient(transport=transport)
        real(self, *args, **kwargs)

    monkeypatch.setattr(AsyncOpenAI, "__init__", patched)
    out = tmp_path / "bench"
    code = main(["--base-url", "http://fake/v1", "--concurrency", "1,4", "--requests", "8", "--max-tokens", "5",
                 "--ignore-eos", "--warmup", "1", "--out", str(out)])
    assert code == 1  # the fake endpoint refuses one prompt: errors are reported, not hidden
    payload = json.loads((out / "bench.json").read_text())
    levels = payload["levels"]
    assert [(lv["mode"], lv["concurrency"]) for lv in levels] == [("plain", 1), ("pad", 1), ("plain", 4), ("pad", 4)]
    assert all(lv["requests"] == 8 and lv["errors"] == 1 and lv["completion_tokens"] == 35 for lv in levels)
    assert [r["concurrency"] for r in payload["ratios"]] == [1, 4]
    pad_bodies = [b for b in bodies if "preference" in b]
    assert pad_bodies and all(b["stream"] and b["ignore_eos"] and b["max_tokens"] == 5 for b in bodies)
    assert "| pad | 4 |" in (out / "bench.md").read_text()
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
