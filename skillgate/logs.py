"""Structured JSON logs: one event per line, with the call id and session id of the work at hand.

Services set :data:`call_context` when they start handling a call, so every line logged while
handling it carries ``call_id`` and ``session_id`` without passing them around. A last-line
defence drops values of fields whose names look like credentials: nothing a service logs should
ever hold a token or key, but a mistaken ``extra={"authorization": ...}`` must not leak one.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from typing import Any

import orjson

call_context: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "skillgate_call_context", default=None
)

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_SENSITIVE = (
    "authorization",
    "token",
    "api_key",
    "apikey",
    "x-api-key",
    "password",
    "secret",
    "cookie",
)


def _is_sensitive(key: str) -> bool:
    k = key.lower()
    return any(s in k for s in _SENSITIVE)


def _redact(value: Any, depth: int = 0) -> Any:
    """Redact credential-named keys at any depth of dicts and lists in a log field."""
    if depth > 6:
        return value
    if isinstance(value, dict):
        return {
            k: "[redacted]" if isinstance(k, str) and _is_sensitive(k) else _redact(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact(v, depth + 1) for v in value]
    return value


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object on one line."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        """Render the record, its extras and the current call context as JSON."""
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self._service,
            "logger": record.name,
            "event": record.getMessage(),
        }
        ctx = call_context.get()
        if ctx is not None:
            out["call_id"], out["session_id"] = ctx
        for key, value in record.__dict__.items():
            if key in _STANDARD or key.startswith("_"):
                continue
            out[key] = "[redacted]" if _is_sensitive(key) else _redact(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def setup(service: str, level: str = "INFO") -> None:
    """Route every logger (ours, uvicorn's, aiokafka's, faust's) to JSON lines on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiokafka", "kafka", "faust", "mode", "httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
