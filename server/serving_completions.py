"""POST /v1/completions: raw prompts (text, token ids, or lists of either), n completions each, echo and
integer logprobs; choice ``index`` = prompt position x n + completion."""
from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from qwen2_triton.runtime.input_processor import is_token_ids
from qwen2_triton.server.engine_client import (ServerContext, collect, new_id, now, sampling_params, start,
                                               unless_disconnected, usage)
from qwen2_triton.server.logprobs import TokenText
from qwen2_triton.server.protocol import CompletionRequest, OpenAIError
from qwen2_triton.server.serving_chat import structured_output
from qwen2_triton.server.sse import DONE, event


def _prompts(prompt) -> list:
    if isinstance(prompt, str) or is_token_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_token_ids(p) for p in prompt):
        return list(prompt)
    raise OpenAIError("prompt must be a non-empty string, a list of token ids, or a list of those", param="prompt")


async def create_completion(req: CompletionRequest, raw: Request, ctx: ServerContext, text: TokenText):
    ctx.check_model(req.model)
    if req.suffix is not None:
        raise OpenAIError("suffix is not supported", param="suffix")
    prompts = _prompts(req.prompt)
    k = req.logprobs
    sp = sampling_params(req, max_tokens=req.max_tokens, logprobs=k,
                         prompt_logprobs=k if (req.echo and k is not None) else None,
                         structured_output=structured_output(req.response_format))
    rid = new_id("cmpl")
    streams = []
    try:
        for i, p in enumerate(prompts):
            streams.append(await start(ctx.engine, p, sp, f"{rid}-{i}"))
    except OpenAIError:
        for s in streams:
            await s.aclose()
        raise
    if req.stream:
        return StreamingResponse(_stream(req, streams, rid, ctx.served_model_name, text),
                                 media_type="text/event-stream")
    try:
        results = await unless_disconnected(raw, asyncio.gather(*(collect(s) for s in streams)), streams)
    finally:
        for s in streams:
            await s.aclose()
    choices, completion_tokens, prompt_tokens = [], 0, 0
    for pi, got in enumerate(results):
        prompt_tokens += len(got.prompt_ids)
        echo_text = text.tokenizer.decode(got.prompt_ids) if req.echo else ""
        for ci in sorted(got.choices):
            c = got.choices[ci]
            completion_tokens += len(c.token_ids)
            choice = {"index": pi * req.n + ci, "text": echo_text + c.text, "finish_reason": c.finish_reason,
                      "stop_reason": c.stop_reason, "logprobs": None}
            if k is not None:
                ids, lps = c.token_ids, c.logprobs or []
                if req.echo:
                    ids, lps = got.prompt_ids + ids, (got.prompt_logprobs or [None] * len(got.prompt_ids)) + lps
                choice["logprobs"] = text.completion_logprobs(ids, lps, k)
            choices.append(choice)
    return JSONResponse({"id": rid, "object": "text_completion", "created": now(), "model": ctx.served_model_name,
                         "choices": choices, "usage": usage(prompt_tokens, completion_tokens)})


async def _stream(req: CompletionRequest, streams: list, rid: str, model: str, text: TokenText):
    base = {"id": rid, "object": "text_completion", "created": now(), "model": model}
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(pi: int, stream):
        try:
            async for out in stream:
                await merged.put((pi, out))
        except Exception as e:  # noqa: BLE001 - reported in-band below
            await merged.put((pi, e))
        finally:
            await merged.put((pi, None))

    tasks = [asyncio.ensure_future(pump(pi, s)) for pi, s in enumerate(streams)]
    offsets: dict[int, int] = {}
    prompt_tokens = completion_tokens = 0
    open_streams = len(streams)
    try:
        while open_streams:
            pi, out = await merged.get()
            if out is None:
                open_streams -= 1
                continue
            if isinstance(out, Exception):
                yield event(OpenAIError(f"generation failed: {out}", status=500, type="InternalServerError").body())
                continue
            for c in out.outputs:
                index = pi * req.n + c.index
                chunk_text, lps = c.text, None
                if index not in offsets:  # the first chunk of this choice
                    offsets[index] = 0
                    if req.echo:
                        prompt_text = text.tokenizer.decode(out.prompt_token_ids)
                        if req.logprobs is not None:
                            ids = list(out.prompt_token_ids)
                            plps = out.prompt_logprobs or [None] * len(ids)
                            yield event({**base, "choices": [{"index": index, "text": prompt_text,
                                                              "logprobs": text.completion_logprobs(ids, plps,
                                                                                                   req.logprobs),
                                                              "finish_reason": None}]})
                            offsets[index] = len(prompt_text)
                        else:
                            chunk_text = prompt_text + chunk_text
                    if c.index == 0:
                        prompt_tokens += len(out.prompt_token_ids)
                completion_tokens += len(c.token_ids)
                if req.logprobs is not None and c.logprobs:
                    lps = text.completion_logprobs(c.token_ids, c.logprobs, req.logprobs, offsets[index])
                offsets[index] += len(chunk_text)
                if chunk_text or lps or c.finish_reason is not None:
                    yield event({**base, "choices": [{"index": index, "text": chunk_text, "logprobs": lps,
                                                      "finish_reason": c.finish_reason,
                                                      "stop_reason": c.stop_reason}]})
        if req.stream_options is not None and req.stream_options.include_usage:
            yield event({**base, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
        yield DONE
    finally:  # the client left early: stop the pumps first (a stream being iterated cannot be closed), then
        for t in tasks:  # close each stream, which aborts its request
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            await s.aclose()
