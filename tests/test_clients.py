"""Client libraries the team did not write, against the gateway and the
worker loop on the tiny engine (fast): langchain-openai (invoke, stream,
structured output, a bound tool), litellm (extra_body), openai-agents (an
Agent on its default Responses path, with store and metadata set, and one
chaining its turns with previous_response_id). Each is
skipped, saying why, where its library is not installed (`pip install -e
'.[test]'` installs them).

Marked integration, on the real embedded model behind a real `pad serve`:
the same clients on plain text, and guidellm's default streaming benchmark
(guidellm pulls its own torch, so it lives in its own virtual environment:
`make guidellm`, or PAD_GUIDELLM=/path/to/guidellm)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Literal

import openai
import pytest
from pydantic import BaseModel
from server_helpers import uvicorn_server, worker_thread

from server.app import create_app
from server.settings import ServerSettings

MODEL = "smollm2-135m-instruct"
QUESTION = "How do I sleep better?"
PREFERENCE = "I like short answers with a bit of humour"
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm: no download of its price list
os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")  # openai-agents: no traces sent to OpenAI


class Verdict(BaseModel):
    ok: bool
    color: Literal["red", "blue"]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    with worker_thread() as (address, _worker), uvicorn_server(
        create_app(ServerSettings(worker_address=address, data_dir=tmp_path_factory.mktemp("clients")))
    ) as url:
        yield f"{url}/v1"


# ---- langchain-openai ---------------------------------------------------
def langchain_model(base_url: str, **kwargs):
    langchain_openai = pytest.importorskip("langchain_openai", reason="langchain-openai is not installed")
    return langchain_openai.ChatOpenAI(model=MODEL, base_url=base_url, api_key="unused", max_retries=0, **kwargs)


def test_langchain_invoke_and_stream_with_a_preference(base_url):
    llm = langchain_model(base_url, max_tokens=6, temperature=0, stream_usage=True,
                          extra_body={"preference": PREFERENCE})
    message = llm.invoke(QUESTION)
    assert message.content and message.response_metadata["finish_reason"] == "length"
    assert message.usage_metadata["output_tokens"] == 6
    chunks = list(llm.stream(QUESTION))
    assert "".join(chunk.content for chunk in chunks) == message.content
    assert sum(chunk.usage_metadata["output_tokens"] for chunk in chunks if chunk.usage_metadata) == 6


def test_langchain_structured_output_and_a_bound_tool(base_url):
    llm = langchain_model(base_url, max_tokens=60, temperature=0)
    assert isinstance(llm.with_structured_output(Verdict).invoke(QUESTION), Verdict)

    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """The weather in a city."""
        return "sunny"

    # strict: no properties beyond the function's (the tiny model would invent long ones)
    message = llm.bind_tools([get_weather], tool_choice="get_weather", strict=True).invoke("Weather in Paris?")
    (call,) = message.tool_calls
    assert call["name"] == "get_weather" and call["args"]["city"] in ("Paris", "Rome")


# ---- litellm --------------------------------------------------------------
def test_litellm_with_extra_body(base_url):
    litellm = pytest.importorskip("litellm", reason="litellm is not installed")
    response = litellm.completion(model=f"openai/{MODEL}", api_base=base_url, api_key="unused", max_tokens=5,
                                  messages=[{"role": "user", "content": QUESTION}], temperature=0,
                                  extra_body={"preference": PREFERENCE, "pad": {"weight": 2.0}})
    assert response.choices[0].message.content and response.usage.completion_tokens == 5
    pad = response.model_extra.get("pad") or getattr(response, "pad", None)
    assert pad is None or pad["weight"] == 2.0  # litellm may drop unknown fields; the answer came back
    stream = litellm.completion(model=f"openai/{MODEL}", api_base=base_url, api_key="unused", max_tokens=4,
                                messages=[{"role": "user", "content": QUESTION}], stream=True,
                                extra_body={"preference": PREFERENCE})
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream)


# ---- openai-agents ------------------------------------------------------
def agents_setup(base_url: str):
    agents = pytest.importorskip("agents", reason="openai-agents is not installed")
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)
    agents.set_default_openai_client(AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0),
                                     use_for_tracing=False)
    agents.set_default_openai_api("responses")  # the default; said so the test does not depend on it
    return agents


def agent_weather_tool(agents, cities: list[str] | None = None):
    """openai-agents' function tool `get_weather`, recording the cities it is called with."""

    @agents.function_tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """The weather in a city."""
        if cities is not None:
            cities.append(city)
        return f"sunny in {city}"

    return get_weather


async def test_an_agent_on_the_responses_path_with_store_and_metadata(base_url):
    agents = agents_setup(base_url)
    settings = agents.ModelSettings(store=True, metadata={"team": "docs"}, max_tokens=60, temperature=0,
                                    extra_body={"preference": PREFERENCE})
    # The tiny random model never ends plain text on its own (the answer is
    # then "incomplete", which the SDK raises on); a structured output ends
    # when its grammar does. Plain text: the integration test below.
    agent = agents.Agent(name="judge", instructions="Answer with a verdict.", model=MODEL, output_type=Verdict,
                         model_settings=settings)
    result = await agents.Runner.run(agent, QUESTION)
    assert isinstance(result.final_output, Verdict)
    streamed = agents.Runner.run_streamed(agent, QUESTION)
    deltas = [event async for event in streamed.stream_events()
              if event.type == "raw_response_event" and event.data.type == "response.output_text.delta"]
    assert deltas and streamed.final_output == result.final_output


async def test_an_agent_with_a_function_tool(base_url):
    """A forced call (tool_choice "required" or the tool's name) runs the
    tool; stop_on_first_tool makes its result the final output. (Without it
    the SDK resets tool_choice to its default, "auto", for the next turn:
    the tests below.)"""
    agents = agents_setup(base_url)
    cities: list[str] = []
    get_weather = agent_weather_tool(agents, cities)

    for choice in ("required", "get_weather"):
        settings = agents.ModelSettings(tool_choice=choice, store=False, metadata={"team": "docs"}, max_tokens=60,
                                        temperature=0, extra_body={"preference": PREFERENCE})
        agent = agents.Agent(name="weather", instructions="Use the tool.", model=MODEL, tools=[get_weather],
                             model_settings=settings, tool_use_behavior="stop_on_first_tool")
        result = await agents.Runner.run(agent, "Weather in Paris?")
        assert result.final_output == f"sunny in {cities[-1]}"
        streamed = agents.Runner.run_streamed(agent, "Weather in Paris?")
        [event async for event in streamed.stream_events()]
        assert streamed.final_output == result.final_output


async def test_an_agent_with_tools_and_an_output_type(base_url):
    """openai-agents sends the tools (tool_choice "auto") and the output
    type's schema together: the answer is a call or the output type, never
    free text, so the run ends with the typed output (or a tool's)."""
    agents = agents_setup(base_url)

    get_weather = agent_weather_tool(agents)

    settings = agents.ModelSettings(store=False, max_tokens=60, temperature=0, parallel_tool_calls=False)
    agent = agents.Agent(name="judge", instructions="Answer with a verdict.", model=MODEL, output_type=Verdict,
                         tools=[get_weather], model_settings=settings, tool_use_behavior="stop_on_first_tool")
    result = await agents.Runner.run(agent, QUESTION)
    assert isinstance(result.final_output, Verdict) or result.final_output.startswith("sunny in ")


async def test_an_agent_chains_its_turns_with_previous_response_id(base_url):
    """auto_previous_response_id: after the first turn the SDK sends only the
    tool's output and the previous response's id; the kept conversation
    (the call among it) gives the next turn the rest."""
    import httpx
    from openai import AsyncOpenAI

    agents = agents_setup(base_url)
    sent: list[dict] = []
    statuses: list[int] = []

    async def record(request):
        sent.append(json.loads(request.content))

    async def answered(response):
        statuses.append(response.status_code)

    hooks = {"request": [record], "response": [answered]}
    agents.set_default_openai_client(AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0,
                                                 http_client=httpx.AsyncClient(event_hooks=hooks)),
                                     use_for_tracing=False)
    settings = agents.ModelSettings(tool_choice="get_weather", max_tokens=60, temperature=0)
    agent = agents.Agent(name="weather", instructions="Use the tool, then judge.", model=MODEL,
                         tools=[agent_weather_tool(agents)], output_type=Verdict, model_settings=settings)
    try:
        result = await agents.Runner.run(agent, "Weather in Paris?", auto_previous_response_id=True, max_turns=4)
        assert isinstance(result.final_output, Verdict)
    except (agents.exceptions.ModelBehaviorError, agents.exceptions.MaxTurnsExceeded):
        # The random model's later turns (their prompts hold random call ids) may call again, or run
        # out of tokens: incomplete, which the SDK raises on. The chaining is what is checked here.
        pass
    except openai.BadRequestError as exc:
        # ...or grow the kept conversation past the tiny model's 512-token context by the last turn
        assert exc.code == "context_length_exceeded" and statuses[-1] == 400, exc
        statuses.pop()
    assert statuses and set(statuses) == {200}  # every chained turn was served
    assert len(sent) >= 2 and "previous_response_id" not in sent[0]
    for body in sent[1:]:  # only what is new: the call's output, on the kept conversation
        assert body["previous_response_id"].startswith("resp_")
        assert {item["type"] for item in body["input"]} == {"function_call_output"}  # one per call made


# ---- tool_choice "auto": a model that wants to call ------------------------
@pytest.fixture(scope="module")
def calling_base_url(tmp_path_factory):
    """The tiny engine made to want "[" most: with tool_choice "auto" (what
    these libraries send by default) it answers with calls."""
    import torch

    from pad_core.testing import biased, embedded_tokenizer, tiny_engine

    engine = tiny_engine()
    bias = torch.zeros(len(embedded_tokenizer()))
    bias[embedded_tokenizer().convert_tokens_to_ids("[")] = 30.0
    with biased(engine, bias), worker_thread(engine=engine) as (address, _worker), uvicorn_server(
        create_app(ServerSettings(worker_address=address, data_dir=tmp_path_factory.mktemp("calling")))
    ) as url:
        yield f"{url}/v1"


def test_langchain_bind_tools_with_its_default_tool_choice(calling_base_url):
    llm = langchain_model(calling_base_url, max_tokens=60, temperature=0, extra_body={"preference": PREFERENCE})

    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """The weather in a city."""
        return "sunny"

    # one call: the tiny model that loves "[" would fill its tokens with parallel calls
    bound = llm.bind_tools([get_weather], strict=True, parallel_tool_calls=False)
    message = bound.invoke("Weather in Paris?")
    (call,) = message.tool_calls
    assert call["name"] == "get_weather" and call["args"]["city"] in ("Paris", "Rome")
    streamed = None
    for chunk in bound.stream("Weather in Paris?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [(call["name"], call["args"])]


async def test_an_agent_with_its_default_tool_choice(calling_base_url):
    agents = agents_setup(calling_base_url)
    cities: list[str] = []
    get_weather = agent_weather_tool(agents, cities)

    settings = agents.ModelSettings(store=False, max_tokens=60, temperature=0,  # tool_choice unset: "auto"
                                    parallel_tool_calls=False)
    agent = agents.Agent(name="weather", instructions="Use the tool when it helps.", model=MODEL,
                         tools=[get_weather], model_settings=settings, tool_use_behavior="stop_on_first_tool")
    result = await agents.Runner.run(agent, "Weather in Paris?")
    assert result.final_output == f"sunny in {cities[-1]}"
    streamed = agents.Runner.run_streamed(agent, "Weather in Paris?")
    kinds = [event.data.type async for event in streamed.stream_events() if event.type == "raw_response_event"]
    assert "response.function_call_arguments.done" in kinds and "response.output_text.delta" not in kinds
    assert streamed.final_output == result.final_output


# ---- the real model (integration) ----------------------------------------
@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    from test_server_api import Server

    running = Server(tmp_path_factory.mktemp("clients-real"))
    yield running
    running.close()


@pytest.mark.integration
async def test_real_clients_on_plain_text(real_server):
    """The bar's snippets, as the README shows them, on the embedded model."""
    base_url = f"{real_server.url}/v1"
    llm = langchain_model(base_url, max_tokens=40, extra_body={"preference": PREFERENCE})
    assert llm.invoke(QUESTION).content and "".join(c.content for c in llm.stream(QUESTION))
    litellm = pytest.importorskip("litellm")
    answer = litellm.completion(model=f"openai/{MODEL}", api_base=base_url, api_key="unused", max_tokens=40,
                                messages=[{"role": "user", "content": QUESTION}], extra_body={"preference": PREFERENCE})
    assert answer.choices[0].message.content
    agents = agents_setup(base_url)
    agent = agents.Agent(name="assistant", instructions="Answer in one short sentence.", model=MODEL,
                         model_settings=agents.ModelSettings(store=False, metadata={"team": "docs"}, max_tokens=200,
                                                             temperature=0, extra_body={"preference": PREFERENCE}))
    result = await agents.Runner.run(agent, "Say hello.")
    assert isinstance(result.final_output, str) and result.final_output


@pytest.mark.integration
def test_real_structured_outputs_and_tool_calls(real_server):
    import openai

    client = openai.OpenAI(base_url=f"{real_server.url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Describe the sky as JSON."}]
    as_object = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=200, temperature=0,
                                               response_format={"type": "json_object"})
    assert isinstance(json.loads(as_object.choices[0].message.content), dict)
    parsed = client.chat.completions.parse(model=MODEL, messages=messages, max_tokens=100, temperature=0,
                                           response_format=Verdict, extra_body={"preference": PREFERENCE})
    assert isinstance(parsed.choices[0].message.parsed, Verdict)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"]}}}
    called = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                            max_tokens=100, temperature=0, tools=[tool],
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = called.choices[0].message.tool_calls
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    # tool_choice "auto": the model's choice, calls or text, each well formed. (Greedy, this one answers
    # the question in text, and after a call in the history calls again, as the history shows it.)
    history = [{"role": "user", "content": "Weather in Paris?"}, called.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "sunny and 24 degrees"}]
    for messages in ([{"role": "user", "content": "What is the capital of France?"}], history):
        choice = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=100, temperature=0,
                                                tools=[tool]).choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            assert all(isinstance(json.loads(c.function.arguments)["city"], str) for c in choice.message.tool_calls)
        else:
            content = choice.message.content
            assert choice.finish_reason == "stop" and content.strip() and content[:1] not in ("[", "{")
    completion = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert completion.choices[0].text


def guidellm_binary() -> str | None:
    candidates = [os.environ.get("PAD_GUIDELLM"), str(Path(__file__).parents[1] / ".venv-guidellm/bin/guidellm"),
                  shutil.which("guidellm")]
    return next((c for c in candidates if c and Path(c).exists()), None)


@pytest.mark.integration
def test_guidellm_default_streaming_benchmark(real_server, tmp_path):
    """guidellm's default run (streaming chat completions, with
    stream_options.continuous_usage_stats and ignore_eos): every request
    succeeds and time to first token is reported."""
    binary = guidellm_binary()
    if binary is None:
        pytest.skip("guidellm is not installed (make guidellm: its own venv, as it pulls its own torch)")
    from pad_core.model_loading import resolve_model_folder
    from pad_core.settings import EngineSettings

    tokenizer = str(resolve_model_folder("embedded", EngineSettings().cache_dir))
    report = tmp_path / "benchmarks.json"
    command = [binary, "run", "--backend", f"kind=openai_http,target={real_server.url},model={MODEL}",
               "--profile", "kind=synchronous", "--constraint", "kind=max_requests,count=4",
               "--data", "kind=synthetic_text,prompt_tokens=32,output_tokens=16",
               "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
               "--output", f"kind=json,path={report}", "--disable-console-interactive"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (benchmark,) = json.loads(report.read_text())["benchmarks"]
    assert benchmark["config"]["backend"]["request_format"] == "/v1/chat/completions"  # its default, streamed
    metrics = benchmark["metrics"]
    totals = metrics["request_totals"]  # guidellm may leave out a request it counts as warm-up
    assert totals["successful"] >= 3 and totals["errored"] == totals["incomplete"] == 0, totals
    ttft = metrics["time_to_first_token_ms"]["successful"]
    assert ttft["count"] == totals["successful"] and ttft["mean"] > 0
    assert metrics["output_token_count"]["successful"]["mean"] == 16  # ignore_eos honoured
