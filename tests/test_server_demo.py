"""The server over the demo model (Qwen2.5-Coder-0.5B-Instruct), where behaviour needs a trained model: tool
calls parsed into OpenAI tool_calls, a named tool_choice, and response_format outputs that parse and validate."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from live_server import running_server
from qwen2_triton.runtime.async_llm import AsyncLLM

NAME = "demo"
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "languages": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "languages"], "additionalProperties": False}


@pytest.fixture(scope="module")
def client(demo_gguf):
    engine = AsyncLLM(demo_gguf, device="cpu", progress=False, max_model_len=1024, kv_cache_tokens=2048)
    try:
        with running_server(engine, NAME) as url:
            yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    finally:
        engine.shutdown()


def test_tool_call_parsed_whole_and_streamed(client):
    got = client.chat.completions.create(model=NAME, messages=ASK, tools=WEATHER, max_tokens=40, temperature=0)
    choice = got.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    calls, finish, content = {}, None, ""
    for chunk in client.chat.completions.create(model=NAME, messages=ASK, tools=WEATHER, max_tokens=40,
                                                temperature=0, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or ():
            calls.setdefault(tc.index, []).append(tc)
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content == "" and list(calls) == [0]
    assert calls[0][0].function.name == "get_weather"
    assert json.loads("".join(tc.function.arguments or "" for tc in calls[0])) == {"city": "Paris"}
    # tool_choice "none": the same question gets no parsing, the text comes back as content
    plain = client.chat.completions.create(model=NAME, messages=ASK, tools=WEATHER, tool_choice="none",
                                           max_tokens=40, temperature=0).choices[0]
    assert plain.message.tool_calls is None and plain.finish_reason in ("stop", "length")


def test_named_tool_choice_forces_valid_arguments(client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    got = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Say hello."}],
                                         tools=WEATHER, tool_choice=choice, max_tokens=40, temperature=0)
    (call,) = got.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and got.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER[0]["function"]["parameters"])


def test_response_format_json_object_and_schema(client):
    ask = [{"role": "user", "content": "Describe a programmer as JSON with name, age and languages."}]
    obj = client.chat.completions.create(model=NAME, messages=ask, max_tokens=120, temperature=0,
                                         response_format={"type": "json_object"}).choices[0]
    assert obj.finish_reason == "stop" and isinstance(json.loads(obj.message.content), dict)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    whole = client.chat.completions.create(model=NAME, messages=ask, max_tokens=120, temperature=0,
                                           response_format=fmt).choices[0]
    assert whole.finish_reason == "stop"
    jsonschema.validate(json.loads(whole.message.content), PERSON)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=NAME, messages=ask, max_tokens=120, temperature=0, response_format=fmt, stream=True) if c.choices)
    assert streamed == whole.message.content
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}
    with pytest.raises(openai.BadRequestError, match="objectx"):
        client.chat.completions.create(model=NAME, messages=ask, max_tokens=5, response_format=bad)
