"""/v1/users/{user_id}/preferences over HTTP: CRUD (on SQLite and
PostgreSQL), OpenAI-shaped errors, 400 / 401 / 403 / 404, key scopes, and
the openai SDK's generic calls the README shows."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from store_helpers import asgi_client, assert_error, db_url, store_app, store_config  # noqa: F401  (fixture)

from server.auth_scopes import KeyTable, chat_user, check_admin, check_user, load_keys_file, split_key_list
from server.store import Forbidden, Store

URL = "/v1/users/{}/preferences"


@pytest.fixture
async def store(db_url):  # noqa: F811
    store = await Store.open(store_config(db_url))
    yield store
    await store.close()


async def test_crud(store):
    text = "  Short answers,\n with a bit of humour 😀 \x00  "
    async with asgi_client(store_app(store)) as client:
        assert_error(await client.get(URL.format("alice")), 404, "user_not_found")
        put = await client.put(URL.format("alice"), json={"preferences": [text, {"text": "cite sources", "weight": 0.5}]})
        assert put.status_code == 200, put.text
        body = put.json()
        assert body["object"] == "user.preferences" and body["user"] == "alice"
        assert body["preferences"] == [{"text": text, "weight": 1.0}, {"text": "cite sources", "weight": 0.5}]
        assert isinstance(body["created_at"], int) and body["updated_at"] >= body["created_at"]
        got = (await client.get(URL.format("alice"))).json()
        assert got["preferences"][0]["text"] == text  # verbatim
        patched = await client.patch(URL.format("alice"), json={"add": ["be formal"], "remove": ["cite sources"]})
        assert [p["text"] for p in patched.json()["preferences"]] == [text, "be formal"]
        deleted = await client.delete(URL.format("alice"))
        assert deleted.json() == {"object": "user.preferences.deleted", "user": "alice", "deleted": True}
        assert_error(await client.get(URL.format("alice")), 404)
        assert_error(await client.delete(URL.format("alice")), 404)
        assert_error(await client.patch(URL.format("alice"), json={"add": ["x"]}), 404)
        odd = "user@example.com with spaces ü"
        assert (await client.put(URL.format(odd), json={"preferences": ["x"]})).json()["user"] == odd
        assert (await client.get(URL.format(odd))).json()["preferences"] == [{"text": "x", "weight": 1.0}]


async def test_bad_requests(store):
    async with asgi_client(store_app(store)) as client:
        big = "x" * (store.config.max_preference_chars + 1)
        error = assert_error(await client.put(URL.format("a"), json={"preferences": [big]}), 400, "preference_too_long")
        assert error["param"] == "preferences[0]" and error["type"] == "invalid_request_error"
        many = [f"p{i}" for i in range(store.config.max_preferences + 1)]
        assert_error(await client.put(URL.format("a"), json={"preferences": many}), 400, "too_many_preferences")
        assert_error(await client.put(URL.format("a"), json={}), 400, param="preferences")
        assert_error(await client.put(URL.format("a"), json={"preferences": ["x"], "extra": 1}), 400, "unknown_parameter")
        assert_error(await client.put(URL.format("a"), content=b"{not json"), 400)
        assert_error(await client.put(URL.format("a"), json=["x"]), 400)
        assert_error(await client.put(URL.format("a"), json={"preferences": [{"text": "x", "weight": "heavy"}]}), 400)
        assert_error(await client.put(URL.format("u" * 300), json={"preferences": ["x"]}), 400, param="user_id")
        # a lone surrogate (valid JSON escape, not storable text)
        assert_error(await client.put(URL.format("a"), content=b'{"preferences": ["\\ud800"]}'), 400, "invalid_text")
        # what PostgreSQL cannot hold is a 400 on both backends, never a failed query
        assert_error(await client.put(URL.format("a%00b"), json={"preferences": ["x"]}), 400, "invalid_text")
        assert_error(await client.post("/v1/feedback", json={"completion_id": "c\x00", "rating": 1}), 400)
        assert_error(await client.get(URL.format("a")), 404)  # nothing was stored by the refused writes


async def test_key_scopes(store):
    keys = ["admin-key", "alice-key:alice", "team-key:bob,carol"]
    async with (
        asgi_client(store_app(store, keys), "alice-key") as alice,
        asgi_client(store_app(store, keys), "team-key") as team,
        asgi_client(store_app(store, keys), "admin-key") as admin,
        asgi_client(store_app(store, keys)) as anonymous,
        asgi_client(store_app(store, keys), "wrong") as wrong,
    ):
        assert (await alice.put(URL.format("alice"), json={"preferences": ["mine"]})).status_code == 200
        assert (await team.put(URL.format("carol"), json={"preferences": ["team"]})).status_code == 200
        for method, kwargs in (("get", {}), ("put", {"json": {"preferences": ["x"]}}), ("patch", {"json": {"add": ["x"]}}),
                               ("delete", {})):
            assert_error(await getattr(alice, method)(URL.format("carol"), **kwargs), 403, "user_not_allowed")
            assert_error(await getattr(team, method)(URL.format("alice"), **kwargs), 403)
        assert (await team.get(URL.format("carol"))).json()["preferences"][0]["text"] == "team"
        assert (await admin.get(URL.format("alice"))).status_code == 200  # unbound: every user
        assert (await admin.get(URL.format("carol"))).status_code == 200
        assert_error(await anonymous.get(URL.format("alice")), 401, "invalid_api_key")
        assert_error(await wrong.get(URL.format("alice")), 401, "invalid_api_key")
        assert (await alice.get(URL.format("alice"))).json()["preferences"][0]["text"] == "mine"  # untouched


async def test_openai_sdk_generic_calls(store):
    """The README's SDK examples: the openai client's generic verbs."""
    app = store_app(store, ["sk-alice:alice"])
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
    client = openai.AsyncOpenAI(base_url="http://pad.test/v1", api_key="sk-alice", http_client=http)
    profile = await client.put("/users/alice/preferences", cast_to=object,
                               body={"preferences": ["short answers", {"text": "humour", "weight": 0.5}]})
    assert profile["preferences"][1] == {"text": "humour", "weight": 0.5}
    assert (await client.get("/users/alice/preferences", cast_to=object))["user"] == "alice"
    await client.patch("/users/alice/preferences", cast_to=object, body={"remove": ["humour"]})
    with pytest.raises(openai.PermissionDeniedError):
        await client.get("/users/bob/preferences", cast_to=object)
    with pytest.raises(openai.BadRequestError) as info:
        await client.put("/users/alice/preferences", cast_to=object, body={"preferences": ["x" * 10_000]})
    assert info.value.code == "preference_too_long"
    assert (await client.delete("/users/alice/preferences", cast_to=object))["deleted"] is True
    with pytest.raises(openai.NotFoundError):
        await client.get("/users/alice/preferences", cast_to=object)
    await client.close()


def test_key_specs(tmp_path):
    assert split_key_list("k1,k2:alice,bob,k3:carol;k4") == ["k1", "k2:alice,bob", "k3:carol", "k4"]
    table = KeyTable.from_specs(["k1:alice,bob", "k2", "k3:*", "k4, k5"])
    assert table.authenticate("k1").users == {"alice", "bob"}
    assert table.authenticate("k2").admin and table.authenticate("k3").admin and table.authenticate("k5").admin
    assert table.authenticate("nope") is None and table.authenticate(None) is None
    assert not KeyTable.from_specs([]).enabled and KeyTable.from_specs("a,b:c").enabled
    assert "k1" not in repr(table.authenticate("k1"))  # scopes never carry the key itself
    text_file = tmp_path / "keys.txt"
    text_file.write_text("# team keys\nsk-a:alice   # alice only\nsk-admin\n\n")
    assert load_keys_file(text_file) == [("sk-a", frozenset({"alice"})), ("sk-admin", None)]
    json_file = tmp_path / "keys.json"
    json_file.write_text(json.dumps([{"key": "sk-odd", "users": ["a,b", "c:d"]}, {"key": "sk-all", "users": None}]))
    table = KeyTable.from_specs([], keys_file=json_file)
    assert table.authenticate("sk-odd").users == {"a,b", "c:d"} and table.authenticate("sk-all").admin
    with pytest.raises(ValueError):
        KeyTable.from_specs(["k:alice", "k:bob"])  # one key, two bindings


def test_scope_checks():
    bound = KeyTable.from_specs(["k:alice"]).authenticate("k")
    team = KeyTable.from_specs(["t:bob,carol"]).authenticate("t")
    check_user(None, "anyone")
    check_user(bound, "alice")
    with pytest.raises(Forbidden):
        check_user(bound, "bob")
    assert chat_user(None, None) is None and chat_user(None, "x") == "x"
    assert chat_user(bound, None) == "alice"  # a key bound to one user speaks for it
    with pytest.raises(Forbidden):
        chat_user(bound, "bob")
    with pytest.raises(Forbidden):
        chat_user(team, None)  # several users: must say which
    assert chat_user(team, "carol") == "carol"
    check_admin(None)
    with pytest.raises(Forbidden):
        check_admin(bound)


async def test_ids_with_slashes_and_texts_matched_case_aside(store):
    """A user id may hold "/" (chat's `user` may), sent %2F-encoded or not;
    preference texts match case and spacing aside: a duplicate is refused,
    a PATCH replaces a case variant in place, and a text both added and
    removed is refused."""
    async with asgi_client(store_app(store)) as client:
        for sent in ("team/alice", "team%2Falice"):
            put = await client.put(URL.format(sent), json={"preferences": ["Short answers", "cite sources"]})
            assert put.status_code == 200 and put.json()["user"] == "team/alice", put.text
        got = await client.get(URL.format("team%2Falice"))
        assert got.json()["user"] == "team/alice" and len(got.json()["preferences"]) == 2
        error = assert_error(await client.put(URL.format("bob"), json={"preferences": ["Be brief", "be  BRIEF"]}), 400)
        assert error["param"].startswith("preferences")
        patched = await client.patch(URL.format("team/alice"), json={"add": [{"text": "SHORT answers", "weight": 0.5}]})
        assert patched.json()["preferences"] == [{"text": "SHORT answers", "weight": 0.5},
                                                 {"text": "cite sources", "weight": 1.0}]
        removed = await client.patch(URL.format("team/alice"), json={"remove": ["Cite  Sources"]})
        assert [p["text"] for p in removed.json()["preferences"]] == ["SHORT answers"]
        conflict = await client.patch(URL.format("team/alice"), json={"add": ["be formal"], "remove": ["Be Formal"]})
        assert_error(conflict, 400, "conflicting_preference", "remove")
        assert [p["text"] for p in (await client.get(URL.format("team/alice"))).json()["preferences"]] == ["SHORT answers"]
        assert (await client.delete(URL.format("team/alice"))).json()["deleted"] is True


async def test_a_profile_stored_before_texts_matched_case_aside_still_runs_and_edits(store):
    """Stored by an older server: two texts that differ in case alone. Chats
    run with the first of them (not a 400 for every chat of the user), and
    PATCH edits the profile down to distinct texts."""
    from server.store import schema
    from server.store.base import dumps

    legacy = [{"text": "Be brief", "weight": 1.0}, {"text": "be brief", "weight": 0.5}, {"text": "cite", "weight": 1.0}]
    async with store._write() as conn:
        await conn.execute(schema.user_profiles.insert().values(user_id="old", preferences=dumps(legacy),
                                                                created_at=1, updated_at=1))
    assert [(p.text, p.weight) for p in await store.find_preferences("old")] == [("Be brief", 1.0), ("cite", 1.0)]
    async with asgi_client(store_app(store)) as client:
        assert len((await client.get(URL.format("old"))).json()["preferences"]) == 3  # as stored
        patched = await client.patch(URL.format("old"), json={"add": [{"text": "BE BRIEF", "weight": 2}]})
        assert patched.status_code == 200, patched.text
        assert patched.json()["preferences"] == [{"text": "BE BRIEF", "weight": 2.0}, {"text": "cite", "weight": 1.0}]
        for empty_id in (client.get(URL.format("")), client.put(URL.format(""), json={"preferences": ["x"]})):
            assert_error(await empty_id, 400, "invalid_value", "user_id")
