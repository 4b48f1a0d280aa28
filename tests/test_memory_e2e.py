"""End to end through the gateway's create_app on the tiny engine (a worker
in a thread): a stored preference changes the answer exactly as the same
preference sent inline does; "preference": null turns it off; a key bound
to another user gets 403; the completion is kept and its feedback exports."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from pad_core.training.pairs import load_pairs
from server.store.export import main as feedback_main
from server_helpers import worker_thread

PREFERENCE = "Answer like a pirate, in three words."
MESSAGES = [{"role": "user", "content": "How do I sleep better?"}]


@pytest.fixture
async def gateway(tmp_path):
    from server.app import create_app
    from server.settings import ServerSettings

    with worker_thread() as (address, _worker):
        settings = ServerSettings(worker_address=address, data_dir=tmp_path, api_keys=["sk-admin", "sk-alice:alice"])
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://pad.test")
            deadline = time.monotonic() + 60
            while (await http.get("/health")).status_code != 200:
                assert time.monotonic() < deadline, "the gateway never became healthy"
                await asyncio.sleep(0.05)
            yield app, http, settings
            await http.aclose()


async def test_stored_preference_equals_inline(gateway, tmp_path):
    app, http, settings = gateway
    served = settings.resolved_served_name()

    def sdk(key: str) -> openai.AsyncOpenAI:
        transport = httpx.ASGITransport(app=app)
        return openai.AsyncOpenAI(base_url="http://pad.test/v1", api_key=key,
                                  http_client=httpx.AsyncClient(transport=transport))

    alice, admin = sdk("sk-alice"), sdk("sk-admin")
    await alice.put("/users/alice/preferences", cast_to=object, body={"preferences": [PREFERENCE]})

    async def ask(client, **extra):
        return await client.chat.completions.create(model=served, messages=MESSAGES, max_tokens=12, temperature=0,
                                                    **extra)

    stored = await ask(alice, user="alice")  # the key speaks for alice; the profile applies
    inline = await ask(admin, extra_body={"preference": PREFERENCE})
    plain = await ask(admin)
    off = await ask(alice, user="alice", extra_body={"preference": None})
    assert stored.choices[0].message.content == inline.choices[0].message.content
    assert off.choices[0].message.content == plain.choices[0].message.content
    assert stored.choices[0].message.content != plain.choices[0].message.content  # the preference did something
    with pytest.raises(openai.PermissionDeniedError):
        await ask(alice, user="bob")
    streamed = await ask(alice, user="alice", stream=True)
    chunks = [chunk async for chunk in streamed]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == stored.choices[0].message.content
    kept = await app.state.store.get_completion(chunks[0].id)  # streamed completions are kept too
    assert kept.answer == text and kept.user_id == "alice" and kept.preferences[0].text == PREFERENCE

    # the personalized answer preferred over the plain one: one training pair
    feedback = await alice.post("/feedback", cast_to=object,
                                body={"completion_id": stored.id, "preferred_over": off.id, "rating": "up"})
    assert feedback["user"] == "alice"
    out = tmp_path / "pairs.jsonl"
    assert await asyncio.to_thread(feedback_main, ["export", "--data-dir", str(tmp_path), "--out", str(out)]) == 0
    [pair] = load_pairs(out)
    assert pair.preference == PREFERENCE and pair.chat() == MESSAGES
    assert (pair.chosen, pair.rejected) == (stored.choices[0].message.content, off.choices[0].message.content)
    for client in (alice, admin):
        await client.close()
