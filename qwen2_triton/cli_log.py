"""How the CLI shows the library's logging: records as "qwen2-triton: ..." lines on stderr."""
from __future__ import annotations

import contextlib
import logging
import sys


class _StderrLog(logging.Handler):
    """The library's log records (start-up report, warnings) as lines on stderr: "qwen2-triton: ...". sys.stderr
    is looked up per record, so a caller that swaps it (pytest's capture) keeps getting them."""

    def emit(self, record: logging.LogRecord) -> None:
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        print(f"qwen2-triton: {level}{record.getMessage()}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def library_log_to_stderr():
    """Show the library's log records on stderr for the duration (a CLI command's)."""
    logger, handler = logging.getLogger("qwen2_triton"), _StderrLog()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:  # main() may be called in-process (tests): leave logging as it was
        logger.removeHandler(handler)
        logger.setLevel(level)
