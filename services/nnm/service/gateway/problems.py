"""RFC 9457 problem details for every error the API returns."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..retry import is_transient
from ..store.storage import StorageError

log = logging.getLogger("nnm.gateway")

PROBLEM_JSON = "application/problem+json"
TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Payload too large",
    415: "Unsupported media type",
    422: "Unprocessable content",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
}


#: Problems every /v1 operation can answer: no or a bad key, a key without the scope, invalid input,
#: a dependency (job store, artifact store) briefly down.
COMMON_PROBLEMS = (401, 403, 422, 503)
#: ... and every operation with a body: malformed JSON, a body over its limit.
BODY_PROBLEMS = (400, 413)
PROBLEM_EXAMPLES = {
    400: ("urn:nnm:problem:malformed-json", "the request body is not valid JSON"),
    401: ("urn:nnm:problem:unauthorized", "the API key is not valid"),
    403: ("urn:nnm:problem:forbidden", "this API key lacks the 'write' scope"),
    404: ("about:blank", "no job 'job_0123'"),
    409: ("about:blank", "job 'job_0123' already ended"),
    413: ("urn:nnm:problem:too-large", "the request body is larger than the limit of 1048576 bytes for this route"),
    422: ("urn:nnm:problem:validation", "params.cluster.clusters: Input should be a valid integer"),
    429: ("urn:nnm:problem:rate-limited", "upload rate limit of 10 per minute reached"),
    503: ("urn:nnm:problem:database-unavailable", "the job store is unavailable; retry shortly"),
}


def declare_problems(spec: dict[str, Any]) -> dict[str, Any]:
    """Declare on every /v1 operation the problem+json answers it can give, all with the `Problem`
    schema the server sends (FastAPI's default 422 shape is never sent, so it is dropped)."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for path, operations in spec["paths"].items():
        for op in operations.values():
            responses = op.setdefault("responses", {})
            codes = {int(c) for c in responses if c.isdigit() and 400 <= int(c) < 600}
            if path.startswith("/v1/"):
                codes |= set(COMMON_PROBLEMS)
                if "{" in path:
                    codes.add(404)
                if "requestBody" in op:
                    codes |= set(BODY_PROBLEMS)
            for code in sorted(codes):
                entry = responses.setdefault(str(code), {})
                type_, detail = PROBLEM_EXAMPLES.get(code, ("about:blank", TITLES.get(code, "Error")))
                example = {"type": type_, "title": TITLES.get(code, "Error"), "status": code, "detail": detail,
                           "instance": path}
                entry.setdefault("description", TITLES.get(code, "Error"))
                entry["content"] = {"application/problem+json": {
                    "schema": {"$ref": "#/components/schemas/Problem"}, "example": example}}
    return spec



class ApiProblem(Exception):
    """Raise to answer with a problem+json body."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        type_: str | None = None,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ):
        super().__init__(detail)
        self.status, self.detail, self.headers, self.extensions = status, detail, headers or {}, extensions
        self.type = type_ or "about:blank"
        self.title = title or TITLES.get(status, "Error")


def check_deleted(outcome: str, what: str, object_id: str, users: list[str]) -> None:
    """Turn a store's deletion outcome into the API's answer: 404 when it is not the caller's,
    409 naming the queued or running jobs that still need it."""
    if outcome == "missing":
        raise ApiProblem(404, f"no {what} '{object_id[:80]}'")
    if outcome == "in-use":
        raise ApiProblem(409, f"{what} '{object_id}' is still needed by queued or running job(s) {', '.join(users)}",
                         type_="urn:nnm:problem:in-use", jobs=users)


def problem_response(
    request: Request | None,
    status: int,
    detail: str | None,
    *,
    type_: str = "about:blank",
    title: str | None = None,
    headers: dict[str, str] | None = None,
    **ext: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": type_,
        "title": title or TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    if request is not None:
        body["instance"] = request.url.path
    body.update({k: v for k, v in ext.items() if v is not None})
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _clean_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for e in errors:
        item = {"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg", ""), "type": e.get("type", "")}
        out.append(item)
    return out


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiProblem)
    async def _api_problem(request: Request, exc: ApiProblem) -> JSONResponse:
        return problem_response(
            request, exc.status, exc.detail, type_=exc.type, title=exc.title, headers=exc.headers, **exc.extensions
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _clean_errors(list(exc.errors()))
        if any(e["type"] == "json_invalid" for e in errors):
            return problem_response(
                request,
                400,
                "the request body is not valid JSON",
                errors=errors,
                type_="urn:nnm:problem:malformed-json",
            )
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(p for p in first["loc"] if p != "body") or "request"
        return problem_response(
            request, 422, f"{where}: {first['msg']}", errors=errors, type_="urn:nnm:problem:validation"
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else None
        return problem_response(request, exc.status_code, detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(DBAPIError)
    async def _database(request: Request, exc: DBAPIError) -> JSONResponse:
        if is_transient(exc):
            return problem_response(request, 503, "the job store is unavailable; retry shortly",
                                    type_="urn:nnm:problem:database-unavailable", headers={"Retry-After": "5"})
        log.exception("database error on %s %s", request.method, request.url.path)
        return problem_response(request, 500, "an internal error occurred; it has been logged",
                                type_="urn:nnm:problem:internal")

    @app.exception_handler(StorageError)
    async def _storage(request: Request, exc: StorageError) -> JSONResponse:
        return problem_response(request, 503, f"the artifact store is unavailable ({exc})",
                                type_="urn:nnm:problem:storage-unavailable", headers={"Retry-After": "10"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(
            request, 500, "an internal error occurred; it has been logged", type_="urn:nnm:problem:internal"
        )
