"""A real uvicorn server on 127.0.0.1 in a background thread of the test process, for the openai client."""
from __future__ import annotations

import contextlib
import socket
import threading
import time

import uvicorn

from qwen2_triton.server.api_server import build_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(engine, name: str, **app_kwargs):
    """Serve ``engine`` until the block ends; yields the base URL (http://127.0.0.1:PORT)."""
    port = free_port()
    app = build_app(engine, name, **app_kwargs)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def wait_until(predicate, what: str, limit_s: float = 30.0) -> None:
    """Poll a condition that the server reaches on its own (an abort freeing blocks); the limit only bounds a
    hang, it is not a speed requirement."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.02)
