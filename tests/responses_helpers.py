"""What the Responses API tests share (tests/test_stored_responses.py,
tests/test_conversations.py): greedy short answers from the tiny engine, a
function tool in the Responses shape, the official SDK on a test server
with an API key, and an SDK error's OpenAI error body."""

from __future__ import annotations

import openai

MODEL = "smollm2-135m-instruct"
GREEDY = {"model": MODEL, "temperature": 0, "max_output_tokens": 6}
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                          "required": ["city"], "additionalProperties": False}}


def sdk(server: str, key: str = "admin") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=key, max_retries=0)


def error_of(excinfo) -> dict:
    """The error body of a pytest.raises(openai.APIStatusError) (the SDK
    keeps either the whole body or its "error")."""
    return excinfo.value.body if "message" in excinfo.value.body else excinfo.value.body["error"]
