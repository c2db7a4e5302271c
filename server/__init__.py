"""The OpenAI-compatible HTTP server (`qwen2-triton serve`): FastAPI + uvicorn over runtime/async_llm.AsyncLLM."""
