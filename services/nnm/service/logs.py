"""Log records of the gateway and the workers: plain text for a terminal, or one JSON object a line
(NNM_LOG_FORMAT=json) for a log collector, each carrying the `job_id` and `request_id` it concerns.

The ids travel in context variables: the gateway sets `request_id` per request (RequestIdMiddleware),
the worker sets `job_id` for the job it runs (`job_context`); a record logged anywhere below picks
them up, so no call site has to pass them.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

REQUEST_ID: ContextVar[str | None] = ContextVar("nnm_request_id", default=None)
JOB_ID: ContextVar[str | None] = ContextVar("nnm_job_id", default=None)
#: A request id a client may choose (echoed and logged); anything else is replaced by a fresh one.
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
#: Attributes every LogRecord has: what is left over was passed with `extra=` and goes into the JSON.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "request_id", "job_id"}


class ContextIds(logging.Filter):
    """Copies the current `request_id` and `job_id` onto each record (unless the call passed its own)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        if getattr(record, "job_id", None) is None:
            record.job_id = JOB_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, process, message, ids, extras, exception."""

    def __init__(self, process: str):
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": self.process,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for key in ("job_id", "request_id"):
            if getattr(record, key, None) is not None:
                entry[key] = getattr(record, key)
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self, process: str):
        super().__init__(f"%(asctime)s {process} %(name)s %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = [f"{k}={getattr(record, k)}" for k in ("job_id", "request_id") if getattr(record, k, None)]
        return f"{text} [{' '.join(ids)}]" if ids else text


def configure_logging(level: str, fmt: str, process: str) -> None:
    """Send every record to stderr as text or JSON (`fmt`), with the context's ids; replaces handlers
    set before (this owns the root logger of the process)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process) if fmt == "json" else TextFormatter(process))
    handler.addFilter(ContextIds())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Servers that configured loggers of their own (uvicorn before calling the app factory) log through
    # this handler too, in the same format.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        server_logger = logging.getLogger(name)
        server_logger.handlers.clear()
        server_logger.propagate = True


@contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Records logged inside carry `job_id`."""
    token = JOB_ID.set(job_id)
    try:
        yield
    finally:
        JOB_ID.reset(token)


def request_id_of(headers: dict[bytes, bytes]) -> str:
    """The client's X-Request-ID when it is a sane token, else a fresh one."""
    given = headers.get(b"x-request-id", b"").decode("latin-1").strip()
    return given if _CLIENT_REQUEST_ID.match(given) else uuid.uuid4().hex


class RequestIdMiddleware:
    """ASGI middleware: every request gets an id (the client's X-Request-ID or a fresh one), set for the
    records logged while it is handled and echoed in the answer's X-Request-ID header."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(dict(scope.get("headers") or []))
        token = REQUEST_ID.set(request_id)

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)
