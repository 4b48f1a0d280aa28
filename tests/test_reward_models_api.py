"""POST /v1/reward_models over real HTTP: a LoRA reward adapter loaded into
the running worker serves PAD requests at once; a bad adapter, a taken name
and a key that is not an admin's are refused with OpenAI-shaped errors."""

from __future__ import annotations

import httpx
import pytest
from server_helpers import uvicorn_server, worker_thread
from test_lora import save_random_adapter

from server.app import create_app
from server.settings import ServerSettings

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
