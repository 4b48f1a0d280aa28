"""The model's sampling defaults (pad_core/generation_defaults.py), as vLLM's
--generation-config and --override-generation-config: read from the
model's generation config or a folder, overridden, checked at start-up, and
applied by the gateway to the fields a request leaves out (its own values
win; max_new_tokens caps max_tokens), on every route."""

from __future__ import annotations

import json

import httpx
import pytest
from server_helpers import uvicorn_server, worker_thread

from pad_core.cli_flags import settings_overrides
from pad_core.errors import ModelLoadError
from pad_core.generation_defaults import sampling_defaults
from pad_core.model_loading import engine_for_model
from pad_core.settings import EngineSettings
from pad_core.testing import embedded_tokenizer, tiny_model
from server.app import create_app
from server.cli import main, serve_parser
from server.openai_models import ChatCompletionRequest, CompletionRequest
from server.responses_models import ResponsesRequest
from server.settings import ServerSettings

MODEL = "smollm2-135m-instruct"
RECOMMENDED = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1, "max_new_tokens": 5,
               "do_sample": True}


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_tokenizer()


def model_recommending(tokenizer, **values):
    """A tiny model whose generation config holds `values` (as transformers
    reads a folder's generation_config.json)."""
    model = tiny_model(tokenizer)
    for key, value in values.items():
        setattr(model.generation_config, key, value)
    return model


def test_auto_reads_the_models_generation_config(tokenizer):
    model = model_recommending(tokenizer, **RECOMMENDED)
    assert sampling_defaults("auto", {}, model) == {"temperature": 0.6, "top_p": 0.9, "top_k": 20,
                                                    "repetition_penalty": 1.1, "max_tokens": 5}
    assert sampling_defaults("vllm", {}, model) == {}, "vllm: OpenAI's defaults"
    assert sampling_defaults("auto", {}, tiny_model(tokenizer)) == {}, "a model that recommends nothing"


def test_a_folder_and_overrides(tokenizer, tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "top_p": 0.5}))
    model = model_recommending(tokenizer, temperature=0.9)
    assert sampling_defaults(str(tmp_path), {}, model) == {"temperature": 0.3, "top_p": 0.5}
    assert sampling_defaults(str(tmp_path), {"temperature": 0.7, "max_new_tokens": 9}, model) == {
        "temperature": 0.7, "top_p": 0.5, "max_tokens": 9}
    assert sampling_defaults("vllm", {"min_p": 0.05}, model) == {"min_p": 0.05}


@pytest.mark.parametrize("setting, overrides, named", [
    ("nowhere", {}, "neither 'auto', 'vllm' nor a folder"),
    ("vllm", {"temprature": 0.5}, "'temprature' not among"),
    ("vllm", {"temperature": 5.0}, "temperature must be within"),
    ("vllm", {"top_p": 1.5}, "top_p must be within"),
    ("vllm", {"top_k": 2.5}, "top_k must be a whole number"),
    ("vllm", {"max_new_tokens": 0}, "max_new_tokens must be a whole number from 1 to"),
    ("vllm", {"repetition_penalty": float("nan")}, "repetition_penalty must be a number"),
])
def test_a_bad_generation_config_is_a_clear_start_up_error(tokenizer, setting, overrides, named):
    with pytest.raises(ModelLoadError, match=named):
        sampling_defaults(setting, overrides, tiny_model(tokenizer))


def test_a_requests_own_values_win():
    defaults = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
                "max_tokens": 5}
    bare = ChatCompletionRequest(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    params = bare.to_sampling_params(0, defaults)
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.repetition_penalty,
            params.max_tokens) == (0.6, 0.9, 20, 0.05, 1.1, None)  # the engine sizes it (room, max_new_tokens)
    own = ChatCompletionRequest(model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=0,
                                top_p=1, top_k=-1, min_p=0, repetition_penalty=1.0, max_tokens=3)
    params = own.to_sampling_params(0, defaults)
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.repetition_penalty,
            params.max_tokens) == (0, 1, 0, 0, 1.0, 3)
    assert ChatCompletionRequest(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                 max_completion_tokens=50).to_sampling_params(0, defaults).max_tokens == 50
    assert CompletionRequest(model=MODEL, prompt="Hi").to_sampling_params(0, defaults).temperature == 0.6
    responses = ResponsesRequest(model=MODEL, input="Hi").to_sampling_params(defaults)
    assert (responses.temperature, responses.top_k, responses.max_tokens) == (0.6, 20, None)
    plain = bare.to_sampling_params(0)
    assert (plain.temperature, plain.top_p, plain.top_k, plain.max_tokens) == (1.0, 1.0, 0, None), "OpenAI's"


def test_vllms_flags(tmp_path):
    parser = serve_parser()
    for override in (['{"temperature": 0.5, "max_new_tokens": 64}'], ["temperature=0.5", "max_new_tokens=64"]):
        args = parser.parse_args(["--generation-config", "vllm",
                                  *[part for value in override for part in ("--override-generation-config", value)]])
        settings = ServerSettings(**settings_overrides(args, ServerSettings))
        assert settings.generation_config == "vllm"
        assert settings.override_generation_config == {"temperature": 0.5, "max_new_tokens": 64}
    with pytest.raises(ValueError, match="not a JSON object"):
        settings_overrides(parser.parse_args(["--override-generation-config", "{temperature: 0.5}"]), ServerSettings)


@pytest.mark.parametrize("override, named", [('{"temprature": 1}', "'temprature' not among"),
                                             ("top_p=2", "top_p must be within")])
def test_pad_serve_refuses_a_bad_override_before_loading_a_model(capsys, override, named):
    assert main(["serve", "--override-generation-config", override]) == 2
    assert named in capsys.readouterr().err


def test_every_route_samples_with_the_models_defaults(tokenizer, tmp_path):
    """A model recommending max_new_tokens 5 and temperature 0: answers of
    5 tokens unless a request asks otherwise, the same every time; the
    Responses object reports the temperature it sampled with."""
    model = model_recommending(tokenizer, temperature=0.0, max_new_tokens=5)
    engine = engine_for_model(model, tokenizer, EngineSettings())
    assert engine.model_info()["sampling_defaults"] == {"temperature": 0.0, "max_tokens": 5}
    with worker_thread(engine=engine) as (address, _), \
            uvicorn_server(create_app(ServerSettings(worker_address=address, data_dir=tmp_path))) as url:
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}]}
        first = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60).json()
        again = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60).json()
        assert (first["usage"]["completion_tokens"], first["choices"][0]["finish_reason"]) == (5, "length")
        assert first["choices"][0]["message"]["content"] == again["choices"][0]["message"]["content"], "greedy"
        asked_more = httpx.post(f"{url}/v1/chat/completions", json={**chat, "max_tokens": 8}, timeout=60).json()
        assert asked_more["usage"]["completion_tokens"] == 8, "a request's own max_tokens wins (as vLLM)"
        fewer = httpx.post(f"{url}/v1/chat/completions", json={**chat, "max_tokens": 2}, timeout=60).json()
        assert fewer["usage"]["completion_tokens"] == 2
        legacy = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "Once upon"}, timeout=60).json()
        assert legacy["usage"]["completion_tokens"] == 16, "the legacy route's own default (OpenAI's, as vLLM)"
        legacy = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "Once upon", "max_tokens": None},
                            timeout=60).json()
        assert (legacy["usage"]["completion_tokens"], legacy["choices"][0]["finish_reason"]) == (5, "length")
        response = httpx.post(f"{url}/v1/responses", json={"model": MODEL, "input": "Tell me a story"},
                              timeout=60).json()
        assert response["temperature"] == 0.0 and response["usage"]["output_tokens"] == 5
        assert response["status"] == "incomplete"
        assert response["output"][0]["content"][0]["text"] == first["choices"][0]["message"]["content"]
        own = httpx.post(f"{url}/v1/responses", json={"model": MODEL, "input": "Hi", "temperature": 0.5},
                         timeout=60).json()
        assert own["temperature"] == 0.5


HI = [{"role": "user", "content": "Hi"}]


def test_max_new_tokens_beyond_the_room_left_is_cut_to_the_room(tmp_path):
    """A model whose generation config recommends more new tokens than the
    context leaves (Qwen's max_new_tokens 32768 served with --max-model-len
    8192; or any long prompt): a request that leaves max_tokens out gets
    the room left, as vLLM's get_max_tokens gives it (found in review: it
    was a 400 naming a max_tokens the client never sent)."""
    tokenizer = embedded_tokenizer()
    model = tiny_model(tokenizer)  # a 512-token context
    model.generation_config.max_new_tokens = 4096
    engine = engine_for_model(model, tokenizer, EngineSettings())
    assert engine.model_info()["sampling_defaults"] == {"max_tokens": 4096}
    with worker_thread(engine=engine) as (address, _), \
            uvicorn_server(create_app(ServerSettings(worker_address=address, data_dir=tmp_path))) as url:
        for path, body in (("/v1/chat/completions", {"model": MODEL, "messages": HI, "temperature": 0}),
                           ("/v1/responses", {"model": MODEL, "input": "Hi", "temperature": 0}),
                           ("/v1/responses", {"model": MODEL, "input": "Hi", "temperature": 0,
                                              "truncation": "auto"}),
                           ("/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": None,
                                                "temperature": 0})):
            answer = httpx.post(f"{url}{path}", json=body, timeout=60)
            assert answer.status_code == 200, f"{path} {body}: {answer.status_code} {answer.text[:300]}"


def test_an_explicit_max_tokens_above_max_new_tokens_wins_as_in_vllm():
    """vLLM treats the generation config's max_new_tokens as the default of
    a request that gives none, not as a ceiling on one that does
    (vllm-project/vllm#34063, fixing #34005: get_max_tokens takes
    `max_tokens if max_tokens is not None else default_sampling_params
    ["max_tokens"]`, then the room left). Here an explicit max_tokens 50 is
    not cut to the model's 5."""
    defaults = {"max_tokens": 5}
    assert ChatCompletionRequest(model=MODEL, messages=HI).to_sampling_params(0, defaults).max_tokens is None, \
        "left out: the engine's to size (the model's default, within the room left)"
    assert ChatCompletionRequest(model=MODEL, messages=HI, max_tokens=50).to_sampling_params(0, defaults) \
        .max_tokens == 50
    assert ChatCompletionRequest(model=MODEL, messages=HI, max_completion_tokens=50) \
        .to_sampling_params(0, defaults).max_tokens == 50
    assert CompletionRequest(model=MODEL, prompt="Hi", max_tokens=50).to_sampling_params(0, defaults) \
        .max_tokens == 50
    assert ResponsesRequest(model=MODEL, input="Hi", max_output_tokens=50).to_sampling_params(defaults) \
        .max_tokens == 50


@pytest.mark.parametrize("overrides", [{"top_k": 1e19}, {"max_new_tokens": 2**63}])
def test_a_whole_number_default_beyond_int64_is_refused_at_start_up(overrides):
    """top_k 1e19 or max_new_tokens 2**63 (an override or a
    generation_config.json) is refused at start-up: accepted, every request
    leaving the field out would be a 400 naming a field it never sent, and
    past 2**64 the model info could not be packed for the gateway."""
    with pytest.raises(ValueError, match="generation config"):
        EngineSettings(override_generation_config=overrides)
    with pytest.raises(ModelLoadError):
        sampling_defaults("vllm", overrides, None)


def test_a_server_seed_makes_unseeded_sampling_repeat_across_restarts():
    """vLLM's --seed: two engines started with the same seed sample the same
    answers for the same unseeded requests; without one, they differ."""
    from pad_core.testing import tiny_engine
    from pad_core.types import ChatRequest, SamplingParams

    def answers(seed):
        engine = tiny_engine(EngineSettings(seed=seed))
        requests = [ChatRequest(f"r{i}", HI, [], SamplingParams(max_tokens=8, temperature=1.5)) for i in range(3)]
        # One at a time: the seeds are drawn in the order the requests arrive.
        return ["".join(output.text for output in engine.generate([request])) for request in requests]

    assert answers(7) == answers(7)
    assert answers(7) != answers(8)
    assert answers(None) != answers(None)
