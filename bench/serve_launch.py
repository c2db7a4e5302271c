"""bench serve's own server: ``qwen2-triton serve`` launched in a subprocess on a free local port, with the flags
checked the way the CLI parses them, and stopped gracefully (SIGINT, then the engine's shutdown) however the
benchmark ends."""
from __future__ import annotations

import contextlib
import logging
import shlex
import signal
import subprocess
import sys
import tempfile
import time

import httpx

log = logging.getLogger(__name__)


def serve_namespace(serve_args: str):
    """--serve-args parsed as ``qwen2-triton serve`` parses them (a bad flag fails here, before any load)."""
    from qwen2_triton.cli import build_parser

    return build_parser().parse_args(["serve", *shlex.split(serve_args)])


@contextlib.contextmanager
def launched_server(serve_args: str, timeout: float):
    """``qwen2-triton serve`` in a subprocess on a free 127.0.0.1 port until the block ends; yields (URL, pid)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "qwen2_triton.cli", "serve", *shlex.split(serve_args), "--host", "127.0.0.1",
           "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: nobody reads it while the server runs
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        # SIGTERM (a `timeout`, a CI limit) would end this process without its finally blocks and leave the server
        # running with the CPU to itself: make it unwind like Ctrl-C
        previous = signal.signal(signal.SIGTERM, _interrupt) if _main_thread() else None
        try:
            log.info("launched %s; waiting for %s/health", shlex.join(cmd[1:]), url)
            deadline = time.monotonic() + timeout
            while not _healthy(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    err.seek(0)
                    tail = err.read().decode(errors="replace")[-3000:]
                    raise RuntimeError(f"the launched server {'exited' if proc.poll() is not None else 'timed out'}"
                                       f" before answering /health:\n{tail}")
                time.sleep(0.5)
            yield url, proc.pid
        finally:
            proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown, then the engine's
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False
