"""Qwen2.5 tool-call text -> OpenAI tool_calls, whole and streamed in arbitrary pieces."""
from __future__ import annotations

import json

import pytest

from qwen2_triton.server.tool_parser import StreamingToolParser, parse

TWO = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
       '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>')


def test_parse_tagged_calls_and_keep_content():
    content, calls = parse(TWO)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                  ("get_time", {"tz": "CET"})]
    assert len({c.id for c in calls}) == 2


@pytest.mark.parametrize("text", ["no calls here", "<tool_call>not json</tool_call> tail",
                                  '<tool_call>{"arguments": {}}</tool_call>', '{"name": "unknown_fn"}'])
def test_text_that_is_not_a_call_stays_content(text):
    assert parse(text, names=["get_weather"]) == (text, [])


def test_bare_object_naming_a_tool_is_a_call():
    content, (call,) = parse(' {"name": "get_weather", "arguments": {"city": "Oslo"}}', names=["get_weather"])
    assert content is None and call.name == "get_weather" and json.loads(call.arguments) == {"city": "Oslo"}


def test_cut_off_call_is_still_read():
    content, (call,) = parse('<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}')
    assert json.loads(call.arguments) == {"city": "Rome"}


@pytest.mark.parametrize("step", [1, 2, 3, 5, 11, 1000])
@pytest.mark.parametrize("text,names", [(TWO, []), ('{"name": "get_weather", "arguments": {"a": 1}}', ["get_weather"]),
                                        ("plain text with < and <tool but no call", []),
                                        ('{"not": "a call"}', ["get_weather"])])
def test_streaming_pieces_give_what_parse_gives(text, names, step):
    p = StreamingToolParser(names)
    content, calls = "", []
    for i in range(0, len(text), step):
        c, done = p.feed(text[i:i + step])
        assert "<tool_call" not in c or "<tool_call>not" in c
        content, calls = content + c, calls + done
    c, done = p.finish()
    content, calls = content + c, calls + done
    want_content, want_calls = parse(text, names)
    assert [(x.name, x.arguments) for x in calls] == [(x.name, x.arguments) for x in want_calls]
    assert content.strip() == (want_content or "").strip()
