"""Logging: structlog, JSON lines when not on a TTY (journald, files), readable on a TTY.

Logs go to stderr so that stdout stays free for command output (`monitor --json`, `config`).
Event names are snake_case verbs with numeric fields: `batch_flushed rows=500 ms=4.1`.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default or str).decode()


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog once per process (the supervisor and each child call it)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    exc_info = structlog.processors.format_exc_info if use_json else _passthrough
    structlog.configure(
        processors=[*shared, exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        # One write per line (print() writes the text and the newline separately): the
        # supervisor and its children share stderr, and their lines must not interleave.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging(shared, exc_info, renderer)


def _route_stdlib_logging(shared: list[Any], exc_info: Any, renderer: Any) -> None:
    """Libraries (asyncpg, redis-py) log through `logging`: render their records like ours, so a
    JSON log stays all JSON. They only speak up at WARNING and above; their own retries are
    noise next to streamd's retry lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, exc_info],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)


def _passthrough(_logger: Any, _name: str, event: Any) -> Any:
    return event


def get_logger(**context: Any) -> Any:
    return structlog.get_logger("streamd").bind(**context)


def bind_context(**context: Any) -> None:
    """Bind fields (proc, pid, consumer) to every later line of this process or task."""
    structlog.contextvars.bind_contextvars(**context)
