"""/healthz (process up), /readyz (database, broker and store reachable), /metrics (Prometheus)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool

from api_schemas import Health

from .deps import Gateway, gateway
from .problems import problem_response

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is up")
def healthz() -> Health:
    return Health(status="ok")


def _checks(gw: Gateway) -> dict[str, str]:
    checks = {}
    for name, probe in (("database", gw.ctx.jobs.ping), ("broker", gw.queue.ping), ("store", gw.ctx.store.ping)):
        try:
            probe()
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"unavailable ({exc.__class__.__name__})"
    return checks


@router.get(
    "/readyz",
    response_model=Health,
    summary="Database, broker and artifact store are reachable",
    responses={503: {"description": "Not ready (problem+json with the failing checks)"}},
)
async def readyz(request: Request, gw: Annotated[Gateway, Depends(gateway)]):
    checks = await run_in_threadpool(_checks, gw)
    if all(v == "ok" for v in checks.values()):
        return Health(status="ready", checks=checks)
    failing = ", ".join(k for k, v in checks.items() if v != "ok")
    return problem_response(
        request,
        503,
        f"not ready: {failing} unreachable",
        type_="urn:nnm:problem:not-ready",
        headers={"Retry-After": "5"},
        checks=checks,
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
