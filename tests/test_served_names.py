"""Several served model names (vLLM's --served-model-name a b): a request
may name any of them, /v1/models lists each, answers and metrics carry the
first; one name stays the common case."""

from __future__ import annotations

import httpx
import pytest
from pydantic import ValidationError
from server_helpers import uvicorn_server, worker_thread

from pad_core.cli_flags import settings_overrides
from pad_core.settings import EngineSettings
from pad_core.testing import tiny_engine
from server.app import create_app
from server.cli import serve_parser
from server.settings import ServerSettings

NAMES = ["pad-small", "gpt-4o-mini"]


def test_the_flag_takes_one_name_or_several(monkeypatch):
    parser = serve_parser()
    several = ServerSettings(**settings_overrides(parser.parse_args(["--served-model-name", *NAMES]), ServerSettings))
    assert several.served_names() == NAMES and several.resolved_served_name() == "pad-small"
    one = ServerSettings(**settings_overrides(parser.parse_args(["--served-model-name", "mine"]), ServerSettings))
    assert one.served_names() == ["mine"] and one.resolved_served_name() == "mine"
    monkeypatch.setenv("PAD_SERVED_MODEL_NAME", "mine")
    assert ServerSettings().served_names() == ["mine"]
    monkeypatch.setenv("PAD_SERVED_MODEL_NAME", '["pad-small", "gpt-4o-mini"]')
    assert ServerSettings().served_names() == NAMES
    monkeypatch.delenv("PAD_SERVED_MODEL_NAME")
    assert EngineSettings().served_names() == ["smollm2-135m-instruct"]


@pytest.mark.parametrize("names, problem", [(["a", "a"], "given twice"), (["a", " "], "blank"), ("", "blank")])
def test_names_clients_cannot_tell_apart_are_refused(names, problem):
    with pytest.raises(ValidationError, match=problem):
        EngineSettings(served_model_name=names)


def test_every_name_is_served_and_answers_carry_the_first(tmp_path):
    engine = tiny_engine(EngineSettings(served_model_name=NAMES))
    with worker_thread(engine=engine) as (address, _), \
            uvicorn_server(create_app(ServerSettings(worker_address=address, data_dir=tmp_path))) as url:
        listed = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
        assert [card["id"] for card in listed] == NAMES
        assert httpx.get(f"{url}/v1/models/gpt-4o-mini", timeout=10).json()["id"] == "gpt-4o-mini"
        for name in NAMES:
            answer = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).json()
            assert answer["model"] == "pad-small", "as vLLM: the first name"
        wrong = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert wrong.status_code == 404 and "'pad-small', 'gpt-4o-mini'" in wrong.json()["error"]["message"]
        assert httpx.get(f"{url}/v1/models/gpt-4o", timeout=10).status_code == 404
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert 'vllm:generation_tokens_total{engine="0",model_name="pad-small"} 4.0' in metrics


def test_a_spawned_worker_reads_the_same_settings(monkeypatch):
    """The gateway hands its engine settings to the worker it spawns as
    PAD_* variables: several names and the generation config's overrides
    arrive as they were given (a list was once passed as its Python repr)."""
    from server.settings import worker_environment

    given = EngineSettings(served_model_name=NAMES, override_generation_config={"temperature": 0.5,
                                                                                 "max_new_tokens": 64})
    for name, value in worker_environment(given).items():
        monkeypatch.setenv(name, value)
    read = EngineSettings()
    assert read.served_names() == NAMES
    assert read.override_generation_config == {"temperature": 0.5, "max_new_tokens": 64}
    assert read.model_dump() == given.model_dump()
