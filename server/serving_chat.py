"""POST /v1/chat/completions: messages through the checkpoint's chat template, streamed or whole, with
log-probs, tool calls and response_format."""
from __future__ import annotations

import asyncio
import json

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from qwen2_triton.server import tool_parser
from qwen2_triton.server.engine_client import (ServerContext, collect, new_id, now, sampling_params, start,
                                               unless_disconnected, usage)
from qwen2_triton.server.logprobs import TokenText
from qwen2_triton.server.protocol import ChatCompletionRequest, OpenAIError, ResponseFormat
from qwen2_triton.server.sse import DONE, event


async def create_chat_completion(req: ChatCompletionRequest, raw: Request, ctx: ServerContext, text: TokenText):
    ctx.check_model(req.model)
    if req.top_logprobs and not req.logprobs:
        raise OpenAIError("top_logprobs requires logprobs to be true", param="top_logprobs")
    tools, forced, forced_schema = _tool_setup(req)
    if forced is not None:  # a named tool_choice: the grammar of its parameters makes the reply the arguments
        if req.response_format is not None and req.response_format.type != "text":
            raise OpenAIError("a named tool_choice and a response_format cannot be combined", param="tool_choice")
        structured = structured_output(ResponseFormat(type="json_schema", json_schema={"schema": forced_schema}))
    else:
        structured = structured_output(req.response_format)
    engine = ctx.engine
    loop = asyncio.get_running_loop()
    try:
        prompt = await loop.run_in_executor(None, lambda: engine.tokenizer.apply_chat_template(
            _plain_messages(req.messages), add_generation_prompt=req.add_generation_prompt, tools=tools,
            **(req.chat_template_kwargs or {})))
    except ValueError as e:
        raise OpenAIError(str(e), param="messages") from None
    top_n = req.top_logprobs or 0
    sp = sampling_params(req, max_tokens=req.max_completion_tokens or req.max_tokens,
                         logprobs=top_n if req.logprobs else None, structured_output=structured)
    rid = new_id("chatcmpl")
    stream = await start(engine, prompt, sp, rid)
    parse_tools = tools is not None and forced is None
    if req.stream:
        return StreamingResponse(_stream(req, stream, rid, ctx.served_model_name, text, top_n, parse_tools, forced),
                                 media_type="text/event-stream")
    got = await unless_disconnected(raw, collect(stream), [stream])
    choices = []
    for i in sorted(got.choices):
        c = got.choices[i]
        message = {"role": "assistant", "content": c.text}
        finish = c.finish_reason
        if forced is not None:  # a named tool_choice: the grammar made the text the call's arguments
            message = {"role": "assistant", "content": None,
                       "tool_calls": [tool_parser.ToolCall(forced, c.text).to_openai()]}
            finish = "tool_calls" if finish == "stop" else finish
        elif parse_tools:
            content, calls = tool_parser.parse(c.text, _names(tools))
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": [x.to_openai() for x in calls]}
                finish = "tool_calls"
        choice = {"index": i, "message": message, "finish_reason": finish, "stop_reason": c.stop_reason,
                  "logprobs": None}
        if req.logprobs:
            choice["logprobs"] = {"content": [text.chat_entry(t, lp, top_n) for t, lp in
                                              zip(c.token_ids, c.logprobs or [])]}
        choices.append(choice)
    completion = sum(len(c.token_ids) for c in got.choices.values())
    return JSONResponse({"id": rid, "object": "chat.completion", "created": now(), "model": ctx.served_model_name,
                         "choices": choices, "usage": usage(len(got.prompt_ids), completion)})


async def _stream(req: ChatCompletionRequest, stream, rid: str, model: str, text: TokenText, top_n: int,
                  parse_tools: bool, forced: str | None):
    base = {"id": rid, "object": "chat.completion.chunk", "created": now(), "model": model}

    def chunk(index: int, delta: dict, finish=None, logprobs=None) -> str:
        return event({**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                           "finish_reason": finish}]})

    parsers = {i: tool_parser.StreamingToolParser(_names(req.tools)) for i in range(req.n)} if parse_tools else {}
    called = set()  # (choice, call index) sent
    forced_args = {i: "" for i in range(req.n)}  # a named tool_choice: the arguments, sent whole at the end
    prompt_tokens, completion_tokens = 0, 0
    try:
        for i in range(req.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for out in stream:
            prompt_tokens = len(out.prompt_token_ids)
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                lps = {"content": [text.chat_entry(t, lp, top_n) for t, lp in zip(c.token_ids, c.logprobs)]} \
                    if req.logprobs and c.logprobs else None
                content, calls = c.text, []
                if c.index in parsers:
                    content, calls = parsers[c.index].feed(c.text)
                    if c.finish_reason is not None:
                        more, late = parsers[c.index].finish()
                        content, calls = content + more, calls + late
                if forced is not None:
                    forced_args[c.index] += content
                    content = ""
                    if c.finish_reason is not None:
                        calls = [tool_parser.ToolCall(forced, forced_args[c.index])]
                if content or lps:
                    yield chunk(c.index, {"content": content} if content else {}, logprobs=lps)
                for call in calls:
                    n_sent = sum(1 for x in called if x[0] == c.index)
                    called.add((c.index, n_sent))
                    yield chunk(c.index, {"tool_calls": [call.to_openai(index=n_sent)]})
                if c.finish_reason is not None:
                    finish = c.finish_reason
                    if any(x[0] == c.index for x in called) and finish == "stop":
                        finish = "tool_calls"
                    yield chunk(c.index, {}, finish=finish)
        if req.stream_options is not None and req.stream_options.include_usage:
            yield event({**base, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
    except OpenAIError as e:
        yield event(e.body())
    except Exception as e:  # the engine died mid-stream: tell the client in-band, then end the stream
        yield event(OpenAIError(f"generation failed: {e}", status=500, type="InternalServerError").body())
    yield DONE


def _names(tools) -> list[str]:
    return [t["function"]["name"] for t in tools or ()]


def _plain_messages(messages: list[dict]) -> list[dict]:
    """OpenAI content parts ([{"type": "text", "text": ...}]) joined to a string, as the templates expect;
    tool-call arguments sent back as JSON text become objects, as Qwen's template renders them."""
    out = []
    for i, m in enumerate(messages):
        m = dict(m)
        if isinstance(m.get("content"), list):
            parts = m["content"]
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in parts):
                raise OpenAIError(f"messages[{i}].content: only text parts are supported", param="messages")
            m["content"] = "".join(p.get("text", "") for p in parts)
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                fn = dict(call.get("function", {}))
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except json.JSONDecodeError:
                        pass
                calls.append({**call, "function": fn})
            m["tool_calls"] = calls
        out.append(m)
    return out


def _tool_setup(req: ChatCompletionRequest) -> tuple[list | None, str | None, dict | None]:
    """(tools for the template or None, the function a named tool_choice forces or None, its parameters)."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise OpenAIError("tool_choice needs tools", param="tool_choice")
        return None, None, None
    names = [t.get("function", {}).get("name") for t in req.tools]
    if not all(t.get("type") == "function" and isinstance(n, str) for t, n in zip(req.tools, names)):
        raise OpenAIError("each tool must be {'type': 'function', 'function': {'name': ..., ...}}", param="tools")
    if choice == "none":
        return None, None, None
    if choice in (None, "auto"):
        return req.tools, None, None
    if choice == "required":
        raise OpenAIError("tool_choice 'required' is not supported; use 'auto' or name a function",
                          param="tool_choice")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if choice.get("type") != "function" or not isinstance(name, str):
            raise OpenAIError("tool_choice must be 'none', 'auto' or {'type': 'function', 'function': {'name': "
                              "...}}", param="tool_choice")
        if name not in names:
            raise OpenAIError(f"tool_choice names the function {name!r}, which is not among the tools "
                              f"{names}", param="tool_choice")
        params = req.tools[names.index(name)]["function"].get("parameters") or {"type": "object"}
        return req.tools, name, params
    raise OpenAIError(f"tool_choice {choice!r} is not one of 'none', 'auto' or a named function",
                      param="tool_choice")


def structured_output(fmt: ResponseFormat | None):
    """response_format -> runtime StructuredOutput (None for text)."""
    if fmt is None or fmt.type == "text":
        return None
    from qwen2_triton.runtime.structured_output import StructuredOutput

    try:
        if fmt.type == "json_object":
            return StructuredOutput(json_object=True)
        schema = (fmt.json_schema or {}).get("schema")
        if schema is None:
            raise OpenAIError("response_format json_schema needs json_schema.schema", param="response_format")
        return StructuredOutput(json_schema=schema)
    except ValueError as e:
        raise OpenAIError(str(e), param="response_format") from None
