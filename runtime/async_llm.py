"""The asyncio frontend: many concurrent requests, one engine thread, one continuous batch.

The EngineCore and the OutputProcessor live on a dedicated thread, which owns them: it drains an inbox of adds
and aborts between steps, steps the core, detokenizes, and posts each request's new output to that request's
asyncio.Queue through ``loop.call_soon_threadsafe``. Nothing mutable is shared with the event loop: requests go
in as immutable EngineRequests, outputs come out as fresh RequestOutput objects. Tokenizing (and chat templates,
in the server) run in the default executor, so the event loop only routes bytes and stays responsive while the
engine is saturated (torch releases the GIL inside its kernels).

    engine = AsyncLLM(model=..., max_num_seqs=64)
    async for out in engine.generate("def fib(n):", SamplingParams(max_tokens=32), request_id="r1"):
        print(out.outputs[0].text, end="")   # deltas: only what is new
    engine.shutdown()

Leaving the ``async for`` early (a break, an exception, a cancelled task, a disconnected HTTP client) aborts
the request: its KV blocks are freed at the next step boundary.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from qwen2_triton.runtime.engine_config import EngineConfig
from qwen2_triton.runtime.engine_core import EngineCore
from qwen2_triton.runtime.input_processor import REST_OF_CONTEXT, InputProcessor, ProcessedPrompt
from qwen2_triton.runtime.output_processor import OutputProcessor, RequestState
from qwen2_triton.runtime.sampling_params import RequestOutput, SamplingParams
from qwen2_triton.runtime.step_loop import StepLoop

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5  # how long the idle engine thread sleeps on its inbox before re-checking for shutdown


class EngineDeadError(RuntimeError):
    """The engine thread stopped on an error; no request can be served any more."""


@dataclass(frozen=True)
class _Add:
    processed: ProcessedPrompt
    loop: asyncio.AbstractEventLoop
    sink: asyncio.Queue


@dataclass(frozen=True)
class _Abort:
    request_id: str


class AsyncLLM:
    """Takes every EngineConfig setting as a keyword (runtime/engine_config.py), plus:

    default_max_tokens: what an unset max_tokens means when the checkpoint has no max_new_tokens: None (the
        default, as vLLM's server) = the rest of the context; an int = that many (clamped to the context).
    observer: optional object told about the engine's work, for metrics (server/metrics.py):
        ``step(stats, generation_tokens)`` after each step and ``request_finished(state)`` per finished request
        (runtime/output_processor.RequestState: prompt length, tokens, times); both are called on the engine
        thread and must be quick.
    """

    def __init__(self, model=None, default_max_tokens: int | None = REST_OF_CONTEXT, observer=None, **kwargs):
        self.config = EngineConfig(model=model, **kwargs)
        self.core = EngineCore(self.config)
        self.inputs = InputProcessor(self.core.tokenizer, self.core.vocab_size, self.core.max_model_len,
                                     self.core.capacity_tokens, self.core.generation_defaults,
                                     default_max_tokens=default_max_tokens, rope=self.core.rope)
        self.outputs = OutputProcessor(self.core.tokenizer)
        self.loop = StepLoop(self.core, overlap=self.core.async_output)  # engine thread only
        self.observer = observer
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}  # engine thread only
        self._ids = itertools.count()
        self._stop = threading.Event()
        self.dead: BaseException | None = None
        self.num_unfinished = 0  # requests accepted and not yet finished or aborted (written by the engine thread)
        self._submitted = 0  # adds put in the inbox (written by the event loop only)
        self._received = 0  # adds taken from the inbox (written by the engine thread only)
        self.last_stats: dict = self.core.stats()  # a snapshot the engine thread replaces after each step
        self._thread = threading.Thread(target=self._run, name="qwen2-triton-engine", daemon=True)
        self._thread.start()

    tokenizer = property(lambda self: self.core.tokenizer)
    max_model_len = property(lambda self: self.core.max_model_len)

    # --------------------------------------------------------------------------------------- event-loop side
    async def generate(self, prompt, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields RequestOutputs holding what is new (per completion, ``.outputs[i].index`` says which); the last
        one has ``finished``. Bad input raises ValueError before the first output."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine stopped: {self.dead!r}")
        loop = asyncio.get_running_loop()
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        processed = await loop.run_in_executor(None, self.inputs.process, prompt,
                                               sampling_params or SamplingParams(), rid, 0, time.monotonic())
        return self._follow(processed, loop)

    async def _follow(self, processed: ProcessedPrompt, loop) -> AsyncIterator[RequestOutput]:
        sink: asyncio.Queue = asyncio.Queue()
        self._submitted += 1
        self._inbox.put(_Add(processed, loop, sink))
        if self.dead is not None:  # it died before taking this one (its last drain may have missed it): say so
            raise EngineDeadError(f"the engine stopped: {self.dead!r}")
        finished = False
        try:
            while not finished:
                item = await sink.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:  # the consumer left early (break, error, cancellation, client gone)
                self.abort(processed.request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request; its KV blocks are freed at the next step boundary. Unknown ids are ignored."""
        self._inbox.put(_Abort(request_id))

    def stats(self) -> dict:
        return dict(self.last_stats, unfinished=self.num_unfinished)

    def num_waiting(self) -> int:
        """Requests not yet running: still in the inbox, or queued in the scheduler (as of the last step)."""
        return self._submitted - self._received + self.last_stats["waiting"]

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(None)  # wake the thread
        self._thread.join(timeout)
        if not self._thread.is_alive():  # the engine thread owns the core until it ends
            self.core.close()  # tensor-parallel workers stop

    # ------------------------------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain(block=not self.loop.has_work())
                if self._stop.is_set():
                    break
                if self.loop.has_work():
                    self._step()
        except BaseException as e:  # noqa: BLE001 - every request must hear about it, then the thread ends
            log.exception("engine thread stopped")
            self.dead = e  # set before the last drain: a request put after it sees this (``_follow``)
            err = EngineDeadError(f"the engine stopped: {e!r}")
            sinks = list(self._sinks.values())
            self._sinks.clear()
            while True:  # requests still in the inbox were accepted too: they hear it as well
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Add):
                    sinks.append((item.loop, item.sink))
            for loop, sink in sinks:
                loop.call_soon_threadsafe(sink.put_nowait, err)

    def _drain(self, block: bool) -> None:
        while True:
            try:
                item = self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if isinstance(item, _Add):
                self._add(item)
            elif isinstance(item, _Abort):
                self._abort(item.request_id)

    def _add(self, item: _Add) -> None:
        self._received += 1
        pp = item.processed
        if pp.request_id in self._sinks:
            item.loop.call_soon_threadsafe(item.sink.put_nowait,
                                           ValueError(f"request id {pp.request_id!r} is already in use"))
            return
        self.outputs.add_request(pp.request_id, pp.prompt, pp.engine_requests, pp.engine_requests[0].arrival_time)
        for er in pp.engine_requests:
            self.core.add_request(er)
        self._sinks[pp.request_id] = (item.loop, item.sink)
        self.num_unfinished += 1
        self.last_stats = self.core.stats()  # counts the new request as waiting at once

    def _abort(self, request_id: str) -> None:
        if self._sinks.pop(request_id, None) is None:
            return
        self.core.abort_requests(self.outputs.abort(request_id))
        self.num_unfinished -= 1
        self.last_stats = self.core.stats()  # the freed blocks show at once, not after the next step

    def _step(self) -> None:
        outs = self.loop.step(self._handle)
        self.last_stats = self.core.stats()
        if self.observer is not None:
            self.observer.step(self.last_stats, sum(len(o.new_token_ids) for o in outs))

    def _handle(self, outs) -> list[str]:
        """Detokenize one step's outputs and hand each request what is new (with async output, while the device
        runs the next step); returns the engine ids a stop string finished."""
        changed, aborts = self.outputs.process(outs, time.monotonic())
        for state in changed:
            self._deliver(state)
        return aborts

    def _deliver(self, state: RequestState) -> None:
        sink = self._sinks.get(state.request_id)
        if sink is None:
            return
        delta = state.take_delta()
        if delta is not None:
            loop, q = sink
            loop.call_soon_threadsafe(q.put_nowait, delta)
        if state.finished:
            del self._sinks[state.request_id]
            self.num_unfinished -= 1
            if self.observer is not None:
                self.observer.request_finished(state)
