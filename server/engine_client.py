"""What both completion routes need between an HTTP request and the AsyncLLM: the checks every route makes
(model name, queue room), request -> SamplingParams, running a request while watching for the client leaving,
and collecting deltas into whole choices."""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from starlette.requests import Request

from qwen2_triton.runtime.async_llm import AsyncLLM
from qwen2_triton.runtime.sampling_params import SamplingParams
from qwen2_triton.server.protocol import OpenAIError, SamplingFields

RETRY_AFTER_S = 1


@dataclass
class ServerContext:
    engine: AsyncLLM
    served_model_name: str
    max_queued_requests: int | None = None

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.served_model_name:
            raise OpenAIError(f"The model `{name}` does not exist; this server serves `{self.served_model_name}`.",
                              status=404, param="model", type="NotFoundError")

    def check_room(self) -> None:
        """503 when more requests wait than --max-queued-requests allows (the running batch does not count)."""
        if self.max_queued_requests is None:
            return
        waiting = self.engine.num_waiting()
        if waiting >= self.max_queued_requests:
            raise OpenAIError(f"the server is busy: {waiting} requests are queued (--max-queued-requests "
                              f"{self.max_queued_requests}); retry later", status=503,
                              type="ServiceUnavailableError", headers={"Retry-After": str(RETRY_AFTER_S)})


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sampling_params(req: SamplingFields, *, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None = None, structured_output=None) -> SamplingParams:
    """OpenAI fields -> SamplingParams; unset sampling fields stay unset so generation_config fills them."""
    kw = dict(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
              min_p=req.min_p, repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
              frequency_penalty=req.frequency_penalty, stop=req.stop or None, stop_token_ids=req.stop_token_ids,
              seed=req.seed, n=req.n, ignore_eos=req.ignore_eos, skip_special_tokens=req.skip_special_tokens,
              include_stop_str_in_output=req.include_stop_str_in_output, logprobs=logprobs,
              prompt_logprobs=prompt_logprobs)
    if req.top_k == 0:  # OpenAI-style clients send 0 for "off"
        kw["top_k"] = -1
    if structured_output is not None:
        kw["structured_output"] = structured_output
    try:
        return SamplingParams(**kw)
    except ValueError as e:
        field_name = str(e).split("=")[0].removeprefix("SamplingParams.") if str(e).startswith("SamplingParams.") \
            else None
        raise OpenAIError(str(e), param=field_name) from None


@dataclass
class Choice:
    """One completion, accumulated from deltas."""
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class Collected:
    prompt_ids: list[int]
    choices: dict[int, Choice]
    prompt_logprobs: list | None = None


async def start(engine: AsyncLLM, prompt, sp: SamplingParams, request_id: str):
    """engine.generate with bad input as a 400."""
    try:
        return await engine.generate(prompt, sp, request_id=request_id)
    except ValueError as e:
        raise OpenAIError(str(e)) from None


async def collect(stream) -> Collected:
    """Drain a request's deltas into whole choices."""
    got = None
    async for out in stream:
        if got is None:
            got = Collected(list(out.prompt_token_ids), {}, out.prompt_logprobs)
        elif out.prompt_logprobs is not None:
            got.prompt_logprobs = out.prompt_logprobs
        for c in out.outputs:
            ch = got.choices.setdefault(c.index, Choice(c.index))
            ch.text += c.text
            ch.token_ids += c.token_ids
            if c.logprobs is not None:
                ch.logprobs = (ch.logprobs or []) + list(c.logprobs)
            ch.finish_reason, ch.stop_reason = c.finish_reason, c.stop_reason
    return got


async def unless_disconnected(raw: Request, work, streams: list):
    """Await ``work`` (collecting ``streams``); if the HTTP client disconnects first, close the streams (which
    aborts their requests and frees their KV blocks) and raise CancelledError."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(raw))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        for s in streams:
            await s.aclose()
        raise asyncio.CancelledError("client disconnected")
    return task.result()


async def _disconnected(raw: Request) -> None:
    """Returns when the client has gone (ASGI http.disconnect)."""
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def now() -> int:
    return int(time.time())
