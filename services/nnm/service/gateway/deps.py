"""Per-request dependencies: the service context and the caller's identity (API keys)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..auth import ADMIN, ANONYMOUS, KeyStore, Principal, UploadLimiter, is_admin_key, principal_of
from ..context import ServiceContext
from ..queue import JobQueue
from .problems import ApiProblem


@dataclass
class Gateway:
    """What route handlers need, stored on `app.state.gateway` (no module-level state)."""

    ctx: ServiceContext
    queue: JobQueue
    models: Any  # ModelCache
    assigner: Any = None  # AssignBatcher
    galleries: Any = None  # GalleryCache
    keys: KeyStore = field(init=False)
    uploads: UploadLimiter = field(init=False)
    _keys_checked: float = field(default=-1e9, init=False)
    _keys_exist: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.keys = KeyStore(self.ctx.jobs)
        self.uploads = UploadLimiter(self.ctx.jobs)

    def keys_required(self) -> bool:
        """Whether anonymous callers are refused. In auto mode: once any key has ever existed, for good
        (revoking the last key must not open the service again)."""
        mode = self.ctx.settings.auth
        if mode != "auto":
            return mode == "required"
        if not self._must_ask_for_keys():
            return self._keys_exist
        self._keys_exist = self.keys.any_ever()
        self._keys_checked = time.monotonic()
        return self._keys_exist

    def _must_ask_for_keys(self) -> bool:
        """Auto mode, no key seen yet, and the last look is over 5 s old (a new key takes effect within seconds)."""
        return (self.ctx.settings.auth == "auto" and not self._keys_exist
                and time.monotonic() - self._keys_checked > 5.0)

    def key_created(self) -> None:
        """A key was created through this process: in auto mode, keys are required from now on."""
        self._keys_exist = True

    async def keys_required_async(self) -> bool:
        """`keys_required` from the event loop: a worker thread only when the database must be asked."""
        if self._must_ask_for_keys():
            return await run_in_threadpool(self.keys_required)
        return self.keys_required()


async def gateway(request: Request) -> Gateway:
    """The gateway's state (async: FastAPI would run a plain function on a worker thread, per request)."""
    return request.app.state.gateway


bearer = HTTPBearer(auto_error=False, description="An API key from `nnm keys create`")
UNAUTHORIZED = {"WWW-Authenticate": 'Bearer realm="nnm"'}


def bearer_key(headers: dict[bytes, bytes]) -> str | None:
    """The API key of a request: `Authorization: Bearer <key>` or `X-API-Key: <key>`."""
    auth = headers.get(b"authorization", b"").decode("latin-1").strip()
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    key = headers.get(b"x-api-key", b"").decode("latin-1").strip()
    return key or None


async def authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    x_api_key: Annotated[str | None, Header(alias="X-API-Key", include_in_schema=False)] = None,
) -> Principal:
    """The caller, from `Authorization: Bearer <key>` or `X-API-Key`; 401 without a valid key when keys
    are required, 403 when the key lacks the scope of the method (GET: read, otherwise: write).

    The gateway's `RequestGuard` has already authenticated the request from its headers (before
    the body was read); this dependency only checks the scope. Without the guard it authenticates.
    """
    principal = getattr(request.state, "principal", None)
    if principal is None:
        principal = await _principal_from_key(request.app.state.gateway,
                                              credentials.credentials if credentials else x_api_key)
    return _with_scope(request, principal)


async def caller(request: Request) -> Principal:
    """`authenticate` for a hot route declared without dependencies (FastAPI's dependency resolution
    costs more per request than the rest of such a route): same answers, no dependency graph."""
    return _with_scope(request, await _request_principal(request))


async def _request_principal(request: Request) -> Principal:
    """The caller as the guard found them, or from the request's key where no guard ran."""
    principal = getattr(request.state, "principal", None)
    if principal is None:
        principal = await _principal_from_key(request.app.state.gateway, bearer_key(dict(request.scope["headers"])))
    return principal


def _with_scope(request: Request, principal: Principal, needed: str | None = None) -> Principal:
    needed = needed or ("read" if request.method in {"GET", "HEAD", "OPTIONS"} else "write")
    if needed not in principal.scopes:
        raise ApiProblem(403, f"this API key lacks the '{needed}' scope", type_="urn:nnm:problem:forbidden")
    request.state.principal = principal
    return principal


async def principal_for_key(gw: Gateway, key: str | None) -> Principal | str:
    """The caller with API key `key` (None: no key sent), or why it is refused (a 401's detail)."""
    if not key:
        if await gw.keys_required_async():
            return "an API key is required: send 'Authorization: Bearer <key>'"
        return ANONYMOUS
    admin_key = gw.ctx.settings.admin_key
    if admin_key is not None and is_admin_key(key, admin_key.get_secret_value()):
        return ADMIN
    row = await run_in_threadpool(gw.keys.find, key)
    return "the API key is not valid" if row is None else principal_of(row)


async def _principal_from_key(gw: Gateway, key: str | None) -> Principal:
    principal = await principal_for_key(gw, key)
    if isinstance(principal, str):
        raise ApiProblem(401, principal, type_="urn:nnm:problem:unauthorized", headers=UNAUTHORIZED)
    return principal


def paged(fetch: Any, cursor: str | None, limit: int) -> tuple[list, str | None]:
    """`fetch(cursor, limit)` of a keyset-paginated list, with a 422 for a cursor we did not issue."""
    try:
        return fetch(cursor, limit)
    except ValueError as exc:
        raise ApiProblem(422, f"cursor: {exc}", type_="urn:nnm:problem:validation") from None


async def owner(principal: Annotated[Principal, Depends(authenticate)]) -> str:
    """The identity that owns what this request creates and the only one that can see it (async: no
    worker thread per request for a field read)."""
    return principal.owner


async def administrator(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Principal:
    """The caller of the admin API: a key with the `admin` scope (or NNM_ADMIN_KEY), whatever NNM_AUTH says;
    401 without a key, 403 with a key that lacks the scope. (`credentials` declares the bearer scheme in
    the OpenAPI document; the key is read from the headers, X-API-Key included.)"""
    principal = await _request_principal(request)
    if principal is ANONYMOUS:
        raise ApiProblem(401, "the admin API needs an API key with the 'admin' scope (or NNM_ADMIN_KEY)",
                         type_="urn:nnm:problem:unauthorized", headers=UNAUTHORIZED)
    return _with_scope(request, principal, "admin")
