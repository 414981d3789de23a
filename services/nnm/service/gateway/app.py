"""The FastAPI application factory."""

from __future__ import annotations

import gc
import logging
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI

from api_schemas import Problem
from nnm import __version__

from ..context import ServiceContext
from ..logs import RequestIdMiddleware
from ..queue import JobQueue, LocalQueue, make_queue
from ..store.retention import RetentionSweeper
from ..worker.reconciler import Reconciler
from . import problems
from .assign_batcher import AssignBatcher
from .deps import Gateway, authenticate
from .gallery_cache import GalleryCache
from .guard import RequestGuard
from .model_cache import ModelCache
from .params_doc import document_params
from .routes_admin import router as admin_router
from .routes_backbones import router as backbones_router
from .routes_clusters import router as clusters_router
from .routes_datasets import router as datasets_router
from .routes_health import router as health_router
from .routes_jobs import router as jobs_router
from .routes_models import assign_router
from .routes_models import router as models_router
from .routes_ui import router as ui_router

log = logging.getLogger("nnm.gateway")

DESCRIPTION = """Learn to classify images without labels: upload images, queue SimCLR -> neighbour mining ->
SCAN/NNM clustering -> self-labelling jobs, poll their progress, fetch metrics and pictures, and assign
new images to the discovered clusters. Every error is RFC 9457 problem+json."""


def _metrics(app: FastAPI, ctx: ServiceContext) -> None:
    from prometheus_client import CollectorRegistry, Counter, Histogram
    from prometheus_client.core import GaugeMetricFamily

    registry = CollectorRegistry()
    requests = Counter("nnm_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=registry)
    latency = Histogram(
        "nnm_http_request_seconds",
        "HTTP request latency",
        ["method", "route"],
        registry=registry,
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    )

    class JobGauge:
        def collect(self) -> Any:
            g = GaugeMetricFamily("nnm_jobs_active", "Jobs queued, running or cancelling", labels=["status"])
            try:
                counts = ctx.jobs.count_active()
            except Exception:
                counts = {}
            for status in ("queued", "running", "cancelling"):
                g.add_metric([status], counts.get(status, 0))
            yield g

    registry.register(JobGauge())
    app.state.registry = registry

    app.add_middleware(_Observe, requests=requests, latency=latency)


class _Observe:
    """ASGI middleware counting requests and their latency per route template (plain ASGI: Starlette's
    `BaseHTTPMiddleware` costs a task group and memory streams per request)."""

    def __init__(self, app: Any, requests: Any, latency: Any):
        self.app, self.requests, self.latency = app, requests, latency

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def observed_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, observed_send)
        # The router wrote the matched route into the shared scope.
        path = getattr(scope.get("route"), "path", "unmatched")
        self.requests.labels(scope["method"], path, str(status)).inc()
        self.latency.labels(scope["method"], path).observe(time.perf_counter() - started)


def create_app(
    ctx: ServiceContext | None = None, queue: JobQueue | None = None, reconcile_interval_s: float | None = None
) -> FastAPI:
    """Build the gateway. Without arguments: settings from the environment, migrations applied,
    the queue they name (Celery, or in-process workers in embedded mode)."""
    if ctx is None:
        from ..settings import load_settings

        settings = load_settings()
        ctx = ServiceContext.from_settings(settings, migrate=settings.auto_migrate)
    queue = queue or make_queue(ctx)
    if reconcile_interval_s is None:
        reconcile_interval_s = ctx.settings.reconcile_interval_s

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        reconciler = Reconciler(ctx, queue, reconcile_interval_s) if reconcile_interval_s > 0 else None
        if isinstance(queue, LocalQueue):
            # Embedded: the in-process queue is empty after a restart; put unfinished jobs back.
            from ..worker.reconciler import reconcile_once

            reconcile_once(ctx, queue, republish_after_s=0)
        if reconciler:
            reconciler.start()
        sweeper = RetentionSweeper(ctx) if ctx.settings.artifact_retention_days > 0 else None
        if sweeper:
            sweeper.start()
        # The modules and objects of startup live as long as the process: keep them out of the garbage
        # collector's full passes, which otherwise stall every request in flight (measured: p99 latency).
        gc.freeze()
        try:
            yield
        finally:
            await app.state.gateway.assigner.aclose()
            if sweeper:
                sweeper.stop()
            if reconciler:
                reconciler.stop()
            queue.close()
            ctx.close()

    # Operation ids are the route functions' names (create_job, list_datasets, ...): stable for client
    # generators, unlike FastAPI's default built from the path.
    app = FastAPI(title="nnm", version=__version__, description=DESCRIPTION, lifespan=lifespan,
                  generate_unique_id_function=lambda route: route.name)
    s = ctx.settings
    assigner = AssignBatcher(window_s=s.assign_batch_window_ms / 1000, max_batch=s.assign_max_batch,
                             max_queued_images=s.assign_queue_images)
    app.state.gateway = Gateway(ctx=ctx, queue=queue, models=ModelCache(ctx), assigner=assigner,
                                galleries=GalleryCache(ctx))
    problems.install(app)
    # Authenticate and cap the body before any route (or FastAPI's JSON parsing) reads it. Added before
    # the metrics middleware, so that one wraps it and counts the requests the guard refuses too.
    app.add_middleware(RequestGuard, gateway=app.state.gateway, max_upload_bytes=ctx.settings.max_upload_bytes,
                       max_json_bytes=ctx.settings.max_json_bytes)
    _metrics(app, ctx)
    # Outermost: every answer, the guard's refusals included, carries the request's id, and every
    # record logged while handling it.
    app.add_middleware(RequestIdMiddleware)
    app.include_router(health_router)
    app.include_router(ui_router)
    for router in (datasets_router, jobs_router, clusters_router, models_router, backbones_router):
        app.include_router(router, dependencies=[Depends(authenticate)])
    app.include_router(assign_router)  # authenticates inline: see routes_models
    app.include_router(admin_router)  # needs the admin scope: see routes_admin
    app.openapi = lambda: _document(app)  # type: ignore[method-assign]
    return app


def _document(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document, built once: FastAPI's, with every problem+json answer declared."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        spec.setdefault("components", {}).setdefault("schemas", {})["Problem"] = Problem.model_json_schema(
            ref_template="#/components/schemas/{model}")
        app.openapi_schema = document_params(problems.declare_problems(spec))
    return app.openapi_schema
