"""Qwen2.5's tool calls: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` in the generated text (the
format of its chat template, parsed as vLLM's hermes parser does) -> OpenAI ``tool_calls``.

``parse`` reads a whole reply; ``StreamingToolParser`` is fed text deltas and returns what can be sent now:
content up to a possible ``<tool_call>`` start (a partial tag is held back), and each call once its closing tag
arrives. A block that is not valid JSON with a string "name" stays content, so nothing the model wrote is lost.

Small models often drop the tags and answer with the bare object (the 0.5B demo model answers a weather question
with ``{"name": "get_weather", "arguments": {"city": "Paris"}}``): a reply that is exactly one JSON object naming
one of the request's tools is taken as that call. The streaming parser holds back a reply that starts with "{"
until it can tell.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object as text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self, index: int | None = None) -> dict:
        d = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            d["index"] = index
        return d


def _call(block: str) -> ToolCall | None:
    try:
        obj = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


def _bare_call(text: str, names) -> ToolCall | None:
    call = _call(text.strip()) if text.strip().startswith("{") else None
    return call if call is not None and call.name in names else None


def parse(text: str, names=()) -> tuple[str | None, list[ToolCall]]:
    """(content, calls): content is the text outside the tool-call blocks (None when only calls remain).
    ``names``: the request's tool names, for a bare-object reply."""
    if OPEN not in text:
        bare = _bare_call(text, names)
        return (None, [bare]) if bare is not None else (text, [])
    calls, content, rest = [], [], text
    while OPEN in rest:
        before, after = rest.split(OPEN, 1)
        if CLOSE not in after:  # cut off mid-call (max_tokens): try the unterminated block
            call = _call(after.strip())
            if call is None:
                break
            content.append(before)
            calls.append(call)
            rest = ""
            break
        block, rest = after.split(CLOSE, 1)
        call = _call(block.strip())
        if call is None:  # not a tool call after all: keep it as text
            content.append(before + OPEN + block + CLOSE)
            continue
        content.append(before)
        calls.append(call)
    content.append(rest)
    text_out = "".join(content)
    if calls:
        text_out = text_out.strip()
        return (text_out or None), calls
    return text, []


class StreamingToolParser:
    def __init__(self, names=()):
        self.names = tuple(names)
        self.buffer = ""  # text not yet sent: a possible tag start, or an open call
        self.calls: list[ToolCall] = []
        self.started = False  # some non-blank text went through
        self.bare = False  # the reply began with "{": held whole until finish()

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        """Content that can be sent now, and the calls that completed with this delta."""
        self.buffer += delta
        if not self.started and self.buffer.strip():
            self.started = True
            self.bare = self.buffer.lstrip().startswith("{") and bool(self.names)
        if self.bare:
            return "", []
        content, done = [], []
        while True:
            if OPEN in self.buffer:
                before, after = self.buffer.split(OPEN, 1)
                content.append(before)
                if CLOSE not in after:
                    self.buffer = OPEN + after
                    break
                block, self.buffer = after.split(CLOSE, 1)
                call = _call(block.strip())
                if call is None:
                    content.append(OPEN + block + CLOSE)
                else:
                    done.append(call)
                continue
            hold = _partial_tag_len(self.buffer)
            content.append(self.buffer[: len(self.buffer) - hold])
            self.buffer = self.buffer[len(self.buffer) - hold:]
            break
        self.calls += done
        text = "".join(content)
        if self.calls:  # once calls began, whitespace between them is not content
            text = text.strip()
        return text, done

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the end of the reply: an unterminated call if it parses, else the held text as content."""
        rest, self.buffer = self.buffer, ""
        if self.bare:
            if OPEN not in rest:
                bare = _bare_call(rest, self.names)
                if bare is not None:
                    self.calls.append(bare)
                    return "", [bare]
                return rest, []
            self.bare = False
            content, calls = self.feed("")
            more, late = self.finish()
            return content + more, calls + late
        if rest.startswith(OPEN):
            call = _call(rest[len(OPEN):].strip())
            if call is not None:
                self.calls.append(call)
                return "", [call]
        return rest, []


def _partial_tag_len(text: str) -> int:
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:n]):
            return n
    return 0
