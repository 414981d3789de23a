"""/healthz (process up), /readyz (database and broker reachable; store reported), /metrics (Prometheus)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool

from api_schemas import Health

from .deps import Gateway, gateway
from .problems import ApiProblem, problem_response

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is up")
async def healthz() -> Health:
    # async on purpose: it runs on the event loop, so it answers even while every worker thread is
    # stuck on a stalled database.
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
    summary="Database and broker are reachable (the artifact store is reported)",
    responses={503: {"description": "Not ready (problem+json with the failing checks)"}},
)
async def readyz(request: Request, gw: Annotated[Gateway, Depends(gateway)]):
    checks = await run_in_threadpool(_checks, gw)
    # The artifact store is reported but does not make the gateway unready: an S3 outage would
    # otherwise take every replica out of the load balancer at once, while the API can still list
    # jobs and answers 503 + Retry-After to the requests that need the store.
    failing = ", ".join(k for k, v in checks.items() if v != "ok" and k != "store")
    if not failing:
        return Health(status="ready", checks=checks)
    return problem_response(
        request,
        503,
        f"not ready: {failing} unreachable",
        type_="urn:nnm:problem:not-ready",
        headers={"Retry-After": "5"},
        checks=checks,
    )


@router.get("/metrics", summary="Prometheus metrics (needs a key with the 'metrics' scope when keys are required)",
            response_class=Response)
def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    principal = getattr(request.state, "principal", None)
    if principal is None or "metrics" not in principal.scopes:  # global job counts are not for every key
        raise ApiProblem(403, "/metrics needs an API key with the 'metrics' scope", type_="urn:nnm:problem:forbidden")
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
