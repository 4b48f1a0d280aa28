"""/v1/reward_models over real HTTP: a LoRA reward adapter loaded into the
running worker serves PAD requests at once and is listed; unloaded, it is
refused to new requests and its name is free again; a bad adapter, a taken
name, `self` and a key that is not an admin's are refused with OpenAI-shaped
errors. A worker the gateway restarts gets the adapters as loaded and
unloaded since start."""

from __future__ import annotations

import json

import httpx
import pytest
from server_helpers import uvicorn_server, worker_thread
from test_lora import save_random_adapter

from server.app import create_app
from server.metrics import Metrics
from server.settings import ServerSettings
from server.worker_client import RequestRejected, WorkerClient

MODEL = "smollm2-135m-instruct"
ADMIN, BOUND = "sk-admin", "sk-alice"


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with worker_thread() as (address, _):
        settings = ServerSettings(worker_address=address, data_dir=tmp_path_factory.mktemp("rm"),
                                  api_keys=[ADMIN, f"{BOUND}:alice"])
        with uvicorn_server(create_app(settings)) as base:
            yield base


def post(url: str, path: str, body: dict, key: str = ADMIN) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_a_loaded_adapter_serves_pad_requests(url, tmp_path, tokenizer):
    save_random_adapter(tmp_path / "persrm", tokenizer, seed=3)
    loaded = post(url, "/v1/reward_models", {"name": "persrm", "path": str(tmp_path / "persrm")})
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["id"] == "persrm" and "persrm" in loaded.json()["reward_models"]
    card = httpx.get(f"{url}/v1/models/{MODEL}", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    assert "persrm" in card["reward_models"]
    answer = post(url, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "How do I sleep better?"}], "max_tokens": 5,
        "preference": "short answers", "pad": {"reward_model": "persrm"}}, key=BOUND)
    assert answer.status_code == 200, answer.text
    assert answer.json()["pad"]["reward_model"] == "persrm" and answer.json()["usage"]["completion_tokens"] == 5

    again = post(url, "/v1/reward_models", {"name": "persrm", "path": str(tmp_path / "persrm")})
    assert again.status_code == 400 and again.json()["error"]["code"] == "already_loaded"


def test_an_adapter_that_cannot_load_is_a_400_and_the_server_keeps_serving(url, tmp_path):
    (tmp_path / "empty").mkdir()
    refused = post(url, "/v1/reward_models", {"name": "broken", "path": str(tmp_path / "empty")})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "invalid_adapter" and refused.json()["error"]["param"] == "path"
    health = httpx.get(f"{url}/health")
    assert health.status_code == 200


def test_only_an_admin_key_loads_adapters(url, tmp_path):
    refused = post(url, "/v1/reward_models", {"name": "mine", "path": str(tmp_path)}, key=BOUND)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_key_required"


def get(url: str, path: str, key: str = BOUND) -> httpx.Response:
    return httpx.get(f"{url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=60)


def delete(url: str, path: str, key: str = ADMIN) -> httpx.Response:
    return httpx.delete(f"{url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=60)


def pad_chat(url: str, reward_model: str) -> httpx.Response:
    return post(url, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "How do I sleep better?"}], "max_tokens": 3,
        "preference": "short answers", "pad": {"reward_model": reward_model}}, key=BOUND)


def test_reward_models_are_listed_and_read_by_any_key(url, tmp_path, tokenizer):
    save_random_adapter(tmp_path / "listed", tokenizer, seed=4)
    assert post(url, "/v1/reward_models", {"name": "listed", "path": str(tmp_path / "listed")}).status_code == 200
    listed = get(url, "/v1/reward_models")
    assert listed.status_code == 200, listed.text
    cards = {card["id"]: card for card in listed.json()["data"]}
    assert listed.json()["object"] == "list"
    assert cards["self"] == {"object": "reward_model", "id": "self", "type": "self"}
    assert cards["listed"] == {"object": "reward_model", "id": "listed", "type": "lora"}
    assert get(url, "/v1/reward_models/listed").json() == cards["listed"]
    missing = get(url, "/v1/reward_models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert "self" in missing.json()["error"]["message"]


def test_an_unloaded_adapter_is_refused_to_new_requests_and_its_name_is_free_again(url, tmp_path, tokenizer):
    save_random_adapter(tmp_path / "gone", tokenizer, seed=5)
    assert post(url, "/v1/reward_models", {"name": "gone", "path": str(tmp_path / "gone")}).status_code == 200
    assert pad_chat(url, "gone").status_code == 200

    unloaded = delete(url, "/v1/reward_models/gone")
    assert unloaded.status_code == 200, unloaded.text
    body = unloaded.json()
    assert body["object"] == "reward_model.deleted" and body["id"] == "gone" and body["deleted"] is True
    assert body["in_use"] == 0 and "gone" not in body["reward_models"]
    assert "gone" not in get(url, f"/v1/models/{MODEL}").json()["reward_models"]
    assert get(url, "/v1/reward_models/gone").status_code == 404
    refused = pad_chat(url, "gone")
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "model_not_found"
    assert delete(url, "/v1/reward_models/gone").status_code == 404

    again = post(url, "/v1/reward_models", {"name": "gone", "path": str(tmp_path / "gone")})
    assert again.status_code == 200, again.text
    assert pad_chat(url, "gone").status_code == 200


def test_self_is_not_unloaded_and_only_an_admin_unloads(url):
    kept = delete(url, "/v1/reward_models/self")
    assert kept.status_code == 400 and kept.json()["error"]["code"] == "cannot_unload"
    assert "self" in get(url, "/v1/reward_models").text
    refused = delete(url, "/v1/reward_models/self", key=BOUND)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_key_required"


async def test_a_restarted_worker_gets_the_adapters_loaded_and_unloaded_since_start(tmp_path, monkeypatch):
    settings = ServerSettings(data_dir=tmp_path, reward_adapters={"at_start": str(tmp_path / "a"),
                                                                  "kept": str(tmp_path / "k")})
    client = WorkerClient(settings, Metrics())
    assert json.loads(client.worker_environment()["PAD_REWARD_ADAPTERS"]) == {
        "at_start": str(tmp_path / "a"), "kept": str(tmp_path / "k")}
    replies = iter([{"type": "adapter_loaded", "info": {}},
                    {"type": "adapter_unloaded", "info": {}, "in_use": 0},
                    {"type": "adapter_failed", "error": {"message": "no", "param": "name", "code": "cannot_unload"}}])

    async def worker_answers(message, timeout, forgettable=False):
        return next(replies)

    monkeypatch.setattr(client, "_ask", worker_answers)
    await client.load_adapter("late", "/adapters/late")
    await client.unload_adapter("at_start")
    with pytest.raises(RequestRejected):
        await client.unload_adapter("kept")
    assert json.loads(client.worker_environment()["PAD_REWARD_ADAPTERS"]) == {
        "kept": str(tmp_path / "k"), "late": "/adapters/late"}


async def test_a_stream_running_with_an_adapter_unloaded_meanwhile_finishes(url, tmp_path, tokenizer):
    save_random_adapter(tmp_path / "busy", tokenizer, seed=6)
    assert post(url, "/v1/reward_models", {"name": "busy", "path": str(tmp_path / "busy")}).status_code == 200
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 160,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            "preference": "short answers", "pad": {"reward_model": "busy"}}
    headers = {"Authorization": f"Bearer {BOUND}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as http:
        async with http.stream("POST", "/v1/chat/completions", json=body) as stream:
            lines = stream.aiter_lines()
            first = await anext(line async for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["object"] == "chat.completion.chunk"
            unloaded = await http.delete("/v1/reward_models/busy", headers={"Authorization": f"Bearer {ADMIN}"})
            assert unloaded.status_code == 200 and unloaded.json()["in_use"] == 1
            rest = [json.loads(line[6:]) for line in [line async for line in lines]
                    if line.startswith("data: ") and line != "data: [DONE]"]
    assert rest[-1]["usage"]["completion_tokens"] == 160
    assert any(chunk["choices"] and chunk["choices"][0]["finish_reason"] == "length" for chunk in rest)
    assert pad_chat(url, "busy").status_code == 400
