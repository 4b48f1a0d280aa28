"""POST /v1/feedback over HTTP (SQLite and PostgreSQL): ratings, pairwise
choices, comments, 400 / 403 / 404, and the export of what was recorded into
pairs `pad train` reads."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from store_helpers import asgi_client, assert_error, db_url, store_app, store_config  # noqa: F401  (fixture)

from pad_core.training.pairs import load_pairs
from pad_core.types import Preference
from server.store import Store
from server.store.export import main as feedback_main

PROMPT = [{"role": "user", "content": "Give me a tip to sleep better."}]
PREF = [Preference("short answers with a bit of humour")]


@pytest.fixture
async def store(db_url):  # noqa: F811
    store = await Store.open(store_config(db_url))
    await store.record_completion("chatcmpl-1", messages=PROMPT, answers=["Count sheep. Or goats."], preferences=PREF,
                                  user="alice", model="smollm2-135m-instruct")
    await store.record_completion("chatcmpl-2", messages=PROMPT, answers=["Sleep hygiene is a broad topic ..."],
                                  preferences=PREF, user="alice")
    await store.record_completion("chatcmpl-3", messages=PROMPT, answers=["Keep a regular schedule."],
                                  preferences=PREF, user="alice")
    await store.record_completion("chatcmpl-bob", messages=PROMPT, answers=["Bob's answer"], preferences=PREF, user="bob")
    await store.record_completion("chatcmpl-other", messages=[{"role": "user", "content": "Hi"}], answers=["Hello"],
                                  preferences=PREF, user="alice")
    yield store
    await store.close()


async def test_feedback_and_export(store, db_url, tmp_path):  # noqa: F811
    async with asgi_client(store_app(store)) as client:
        response = await client.post("/v1/feedback", json={"completion_id": "chatcmpl-1", "rating": "up",
                                                           "preferred_over": "chatcmpl-2", "comment": "funnier"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "feedback" and body["id"].startswith("fb-") and body["user"] == "alice"
        assert (body["rating"], body["preferred_over"], body["comment"]) == ("up", "chatcmpl-2", "funnier")
        assert (await client.post("/v1/feedback", json={"completion_id": "chatcmpl-3", "rating": 2})).json()["rating"] == 2
        assert (await client.post("/v1/feedback", json={"completion_id": "chatcmpl-2", "comment": "too long"})).status_code == 200
    out = tmp_path / "pairs.jsonl"
    assert await asyncio.to_thread(feedback_main, ["export", "--out", str(out), "--db-url", db_url]) == 0
    pairs = load_pairs(out)
    got = {(p.chosen, p.rejected) for p in pairs}
    # pairwise 1 > 2; ratings: 1 (up) > 3 (2 stars)
    assert got == {("Count sheep. Or goats.", "Sleep hygiene is a broad topic ..."),
                   ("Count sheep. Or goats.", "Keep a regular schedule.")}
    assert all(p.chat() == PROMPT and p.preference == PREF[0].text for p in pairs)


async def test_errors(store):
    async with asgi_client(store_app(store)) as client:
        post = lambda body: client.post("/v1/feedback", json=body)  # noqa: E731
        assert_error(await post({"completion_id": "chatcmpl-nope", "rating": "up"}), 404, "completion_not_found")
        assert_error(await post({"completion_id": "chatcmpl-1", "preferred_over": "nope"}), 404, param="preferred_over")
        assert_error(await post({"completion_id": "chatcmpl-1", "choice_index": 3, "rating": 1}), 404)
        assert_error(await post({"completion_id": "chatcmpl-1", "rating": 9}), 400, "invalid_rating", "rating")
        assert_error(await post({"completion_id": "chatcmpl-1"}), 400)
        assert_error(await post({"rating": "up"}), 400, param="completion_id")
        assert_error(await post({"completion_id": "chatcmpl-1", "rating": "up", "stars": 3}), 400, "unknown_parameter")
        assert_error(await post({"completion_id": "chatcmpl-1", "preferred_over": "chatcmpl-other"}), 400, "prompt_mismatch")
        assert_error(await post({"completion_id": "chatcmpl-1", "preferred_over": "chatcmpl-1"}), 400)
        assert_error(await post({"completion_id": "chatcmpl-1", "comment": "x" * 5000}), 400, "comment_too_long")
        # /v1/completions' answers are not kept: the 404 says so instead of "not found"
        error = assert_error(await post({"completion_id": "cmpl-abc", "rating": "up"}), 404, "completion_not_kept",
                             "completion_id")
        assert "text completion" in error["message"]
        error = assert_error(await post({"completion_id": "chatcmpl-1", "preferred_over": "cmpl-abc"}), 404,
                             "completion_not_kept", "preferred_over")
        # a fractional rating reaches the rule it breaks, not a type error
        error = assert_error(await post({"completion_id": "chatcmpl-1", "rating": 4.5}), 400, "invalid_rating", "rating")
        assert "integer from 1 to 5" in error["message"]
    assert await store.list_feedback() == []


async def test_key_scopes(store):
    keys = ["sk-alice:alice", "sk-bob:bob", "sk-admin"]
    async with (
        asgi_client(store_app(store, keys), "sk-alice") as alice,
        asgi_client(store_app(store, keys), "sk-bob") as bob,
        asgi_client(store_app(store, keys), "sk-admin") as admin,
        asgi_client(store_app(store, keys)) as anonymous,
    ):
        assert_error(await bob.post("/v1/feedback", json={"completion_id": "chatcmpl-1", "rating": "down"}), 403)
        # alice's completion preferred over bob's: bob's is not hers to judge
        assert_error(await alice.post("/v1/feedback", json={"completion_id": "chatcmpl-1",
                                                            "preferred_over": "chatcmpl-bob"}), 403)
        assert_error(await anonymous.post("/v1/feedback", json={"completion_id": "chatcmpl-1", "rating": 1}), 401)
        assert (await alice.post("/v1/feedback", json={"completion_id": "chatcmpl-1", "rating": 5})).status_code == 200
        assert (await bob.post("/v1/feedback", json={"completion_id": "chatcmpl-bob", "rating": 4})).status_code == 200
        assert (await admin.post("/v1/feedback", json={"completion_id": "chatcmpl-1", "preferred_over": "chatcmpl-bob"})
                ).status_code == 200
    assert len(await store.list_feedback()) == 3


async def test_openai_sdk(store):
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=store_app(store)))
    client = openai.AsyncOpenAI(base_url="http://pad.test/v1", api_key="unused", http_client=http)
    fb = await client.post("/feedback", cast_to=object, body={"completion_id": "chatcmpl-1", "rating": "up"})
    assert fb["completion_id"] == "chatcmpl-1"
    with pytest.raises(openai.NotFoundError):
        await client.post("/feedback", cast_to=object, body={"completion_id": "gone", "rating": "up"})
    await client.close()
