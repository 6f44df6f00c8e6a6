"""The console log lines of the router and the agent, in one format for both (time, level, logger,
message; their log files add the date), and the level of mvllm's own loggers."""

from __future__ import annotations

import errno
import logging
import sys

from mvllm.common.logfiles import LOG_FORMAT

CONSOLE_DATEFMT = "%H:%M:%S"


def console_logging(level: str) -> None:
    """Plain lines on stderr: mvllm's loggers at `level`, everything else (aiohttp, asyncio) from WARNING."""
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, datefmt=CONSOLE_DATEFMT, stream=sys.stderr)
    set_level(level)


def set_level(level: str) -> None:
    logging.getLogger("mvllm").setLevel(level.upper())


def listen_error(host: str, port: int, exc: OSError) -> str:
    """One line for a listen socket that could not be opened, with what to do about a port in use."""
    text = f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    if exc.errno == errno.EADDRINUSE:
        text += " (another process has that port: stop it, or choose another port with --port)"
    return text
