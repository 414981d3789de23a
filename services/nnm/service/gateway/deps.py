"""Per-request dependencies: the service context and the caller's identity."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from ..context import ServiceContext
from ..queue import JobQueue


@dataclass
class Gateway:
    """What route handlers need, stored on `app.state.gateway` (no module-level state)."""

    ctx: ServiceContext
    queue: JobQueue
    models: object  # ModelCache


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway


def owner(request: Request) -> str:
    """The identity that owns what this request creates (API keys narrow it; see the security issue)."""
    return getattr(request.state, "owner", "public")
