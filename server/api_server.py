"""The OpenAI-compatible server: ``qwen2-triton serve`` = FastAPI + uvicorn over one AsyncLLM.

Routes as vLLM's OpenAI server: POST /v1/chat/completions, /v1/completions, /tokenize, /detokenize; GET
/v1/models, /health, /metrics. Every error is OpenAI's body {"error": {"message", "type", "param", "code"}}:
400 for bad input (FastAPI's 422 is turned into 400), 401 without the API key, 404 for another model name, 503
with Retry-After when --max-queued-requests is reached, 500 if the engine died.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.responses import JSONResponse, Response

from qwen2_triton.runtime.async_llm import AsyncLLM, EngineDeadError
from qwen2_triton.server.engine_client import ServerContext
from qwen2_triton.server.logprobs import TokenText
from qwen2_triton.server.metrics import EngineMetrics
from qwen2_triton.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, OpenAIError,
                                          TokenizeRequest)
from qwen2_triton.server.serving_chat import _plain_messages, create_chat_completion
from qwen2_triton.server.serving_completions import create_completion

log = logging.getLogger(__name__)

OPEN_PATHS = ("/health", "/metrics")  # answered without the API key, as vLLM does


def build_app(engine: AsyncLLM, served_model_name: str, metrics: EngineMetrics | None = None,
              api_key: str | None = None, max_queued_requests: int | None = None) -> FastAPI:
    ctx = ServerContext(engine, served_model_name, max_queued_requests)
    text = TokenText(engine.tokenizer)
    app = FastAPI(title="qwen2-triton", docs_url=None, redoc_url=None)
    app.state.ctx = ctx

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, e: OpenAIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            message, param = f"the body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
        else:
            param = ".".join(loc) or None
            message = f"{param}: {err.get('msg', 'invalid')}" if param else err.get("msg", "invalid request")
            if "input" in err and param:
                message += f" (got {json.dumps(err['input'], default=str)[:200]})"
        return JSONResponse(OpenAIError(message, param=param).body(), status_code=400)

    @app.exception_handler(EngineDeadError)
    async def _dead(request: Request, e: EngineDeadError):
        return JSONResponse(OpenAIError(str(e), status=500, type="InternalServerError").body(), status_code=500)

    @app.middleware("http")
    async def _auth_and_count(request: Request, call_next):
        if api_key is not None and request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return JSONResponse(OpenAIError("invalid or missing API key (Authorization: Bearer ...)",
                                                status=401, type="AuthenticationError").body(), status_code=401)
        return await call_next(request)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, raw: Request):
        ctx.check_room()
        return await create_chat_completion(req, raw, ctx, text)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        ctx.check_room()
        return await create_completion(req, raw, ctx, text)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": 0,
                                            "owned_by": "qwen2-triton", "root": served_model_name,
                                            "max_model_len": engine.max_model_len}]}

    @app.get("/health")
    async def health():
        if engine.dead is not None:
            return Response(status_code=503)
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus():
        body = metrics.render() if metrics is not None else b""
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        ctx.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise OpenAIError("give exactly one of prompt or messages", param="prompt")
        loop = asyncio.get_running_loop()

        def work():
            prompt = req.prompt if req.prompt is not None else engine.tokenizer.apply_chat_template(
                _plain_messages(req.messages), add_generation_prompt=req.add_generation_prompt)
            return engine.tokenizer.encode(prompt)
        try:
            ids = await loop.run_in_executor(None, work)
        except ValueError as e:
            raise OpenAIError(str(e), param="messages") from None
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        ctx.check_model(req.model)
        vocab = engine.core.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise OpenAIError(f"token id(s) {bad[:5]} outside the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": engine.tokenizer.decode(req.tokens)}

    return app


def default_model_name(model: str | None) -> str:
    """What /v1/models reports without --served-model-name: the checkpoint's folder or file name."""
    import os

    if model is None:
        from qwen2_triton.model.demo import DEMO_FILE_NAME

        return DEMO_FILE_NAME.removesuffix(".gguf")
    return os.path.basename(os.path.normpath(model)).removesuffix(".gguf")


def serve(engine_kwargs: dict, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
          api_key: str | None = None, max_queued_requests: int | None = None) -> int:
    """Load the model, then serve until interrupted (Ctrl-C / SIGTERM shut down gracefully)."""
    import uvicorn

    name = served_model_name or default_model_name(engine_kwargs.get("model"))
    metrics = EngineMetrics(name)
    engine = AsyncLLM(observer=metrics, **engine_kwargs)
    try:
        app = build_app(engine, name, metrics=metrics, api_key=api_key, max_queued_requests=max_queued_requests)
        log.info("serving %s on http://%s:%d/v1 (max_model_len %d)", name, host, port, engine.max_model_len)
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        engine.shutdown()
    return 0
