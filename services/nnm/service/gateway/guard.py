"""The gateway's outer guard: who is calling, and how many bytes they may send, decided from the
headers before a single byte of the body is read.

FastAPI parses a JSON body before any dependency runs, so an anonymous caller could make the gateway
buffer and parse a huge body before being told it needs a key. This ASGI middleware answers 401
first, and caps bodies per route: uploads (multipart on the upload routes) may be large and are
streamed to disk by the routes; everything else is JSON of at most `max_json_bytes`.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from sqlalchemy.exc import DBAPIError

from ..retry import is_transient
from .deps import bearer_key, principal_for_key

log = logging.getLogger("nnm.gateway")

#: Routes that take a large multipart body (method, path pattern).
UPLOAD_ROUTES = (
    ("POST", re.compile(r"^/v1/datasets/?$")),
    ("POST", re.compile(r"^/v1/backbones/?$")),
    ("POST", re.compile(r"^/v1/models/[^/]+/assign/?$")),
)
#: Paths that need a key when keys are required (health probes stay open for orchestrators).
PROTECTED = re.compile(r"^/(v1/|metrics/?$)")
UNAUTHORIZED_HEADERS = [(b"www-authenticate", b'Bearer realm="nnm"')]


class BodyTooLarge(Exception):
    pass


def _is_upload(method: str, path: str, content_type: str) -> bool:
    return content_type.startswith("multipart/form-data") and any(
        method == m and pattern.match(path) for m, pattern in UPLOAD_ROUTES
    )


class RequestGuard:
    """ASGI middleware: authenticate from headers, then cap the body; both before the app reads it.

    The caller's `Principal` is left in `scope["state"]["principal"]` for the route dependencies.
    """

    def __init__(self, app: Any, gateway: Any, max_upload_bytes: int, max_json_bytes: int):
        self.app, self.gateway = app, gateway
        self.max_upload_bytes, self.max_json_bytes = max_upload_bytes, max_json_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        path, method = scope.get("path", ""), scope.get("method", "GET")
        if "\x00" in path or b"%00" in (scope.get("query_string") or b""):
            # Postgres cannot store or compare text with NUL characters: refuse them up front (no 500).
            await _send_problem(send, path, 400, "Bad request", "NUL characters are not allowed in the path or query",
                                "urn:nnm:problem:bad-request", [])
            return
        if PROTECTED.match(path):
            try:
                problem = await self._authenticate(scope, headers)
            except DBAPIError as exc:  # the key cannot be checked: the same answers as the routes give
                if not is_transient(exc):
                    log.exception("database error while checking an API key")
                    problem = (500, "Internal server error", "an internal error occurred; it has been logged",
                               "urn:nnm:problem:internal", [])
                else:
                    problem = (503, "Service unavailable", "the job store is unavailable; retry shortly",
                               "urn:nnm:problem:database-unavailable", [(b"retry-after", b"5")])
            if problem is not None:
                await _send_problem(send, path, *problem)
                return
        ctype = headers.get(b"content-type", b"").decode("latin-1").lower()
        limit = self.max_upload_bytes if _is_upload(method, path, ctype) else self.max_json_bytes
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_problem(send, path, *_too_large(limit))
            return
        seen = 0
        started = False

        async def counting_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge()
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _send_problem(send, path, *_too_large(limit))

    async def _authenticate(self, scope: dict, headers: dict[bytes, bytes]) -> tuple | None:
        principal = await principal_for_key(self.gateway, bearer_key(headers))
        if isinstance(principal, str):
            return (401, "Unauthorized", principal, "urn:nnm:problem:unauthorized", UNAUTHORIZED_HEADERS)
        scope.setdefault("state", {})["principal"] = principal
        return None


def _too_large(limit: int) -> tuple:
    return (413, "Payload too large", f"the request body is larger than the limit of {limit} bytes for this route",
            "urn:nnm:problem:too-large", [])


async def _send_problem(send: Any, path: str, status: int, title: str, detail: str, type_: str,
                        extra_headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"type": type_, "title": title, "status": status, "detail": detail, "instance": path}).encode()
    headers = [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode()),
               # The body was not read: tell the client the connection will not be reused for it.
               (b"connection", b"close"), *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
