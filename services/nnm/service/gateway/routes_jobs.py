"""/v1/jobs: queue training, mining, clustering, self-labelling, evaluation and whole pipelines."""

from __future__ import annotations

import hashlib
import json
import logging
import mimetypes
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse

from api_schemas import TERMINAL_STATUSES, JobCreate, JobList, JobOut, JobStatus, JobType

from ..jobspec import SpecError, queue_for, submitted_params, validate_job
from ..store.repository import IdempotencyConflict, IdempotencyInFlight, TooManyJobs
from ..store.retention import remove_files
from .convert import job_out
from .deps import Gateway, gateway, owner, paged
from .problems import ApiProblem, check_deleted

log = logging.getLogger("nnm.gateway")
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def _out(gw: Gateway, row) -> JobOut:
    return job_out(row, gw.ctx.jobs.artifacts(row.id))


def owned_job(gw: Gateway, job_id: str, user: str):
    """The job `job_id` if `user` owns it; 404 otherwise (someone else's job does not exist for them)."""
    row = gw.ctx.jobs.get_job(job_id, user)
    if row is None:
        raise ApiProblem(404, f"no job '{job_id}'")
    return row


def enqueue(gw: Gateway, job_id: str, queue: str) -> None:
    """Publish the job; if the broker is down the reconciler publishes it later (Postgres is the truth)."""
    try:
        gw.queue.enqueue(job_id, queue)
        gw.ctx.jobs.mark_enqueued(job_id)
    except Exception as exc:
        log.warning("job %s: could not enqueue yet (%s); the reconciler will retry", job_id, exc)


@router.post(
    "",
    status_code=202,
    response_model=JobOut,
    summary="Queue a job",
    responses={
        409: {"description": "Idempotency-Key still in flight, or an input job not finished"},
        422: {"description": "Invalid parameters or inputs"},
        429: {"description": "The API key has as many queued or running jobs as its limit allows"},
    },
)
def create_job(
    req: JobCreate,
    request: Request,
    response: Response,
    gw: Annotated[Gateway, Depends(gateway)],
    user: Annotated[str, Depends(owner)],
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobOut:
    principal = request.state.principal
    limit = principal.max_queued_jobs or gw.ctx.settings.default_max_queued_jobs
    dataset = gw.ctx.jobs.get_dataset(req.dataset_id, user)
    if dataset is None:
        raise ApiProblem(
            422,
            f"dataset_id: no dataset '{req.dataset_id[:80]}'",
            type_="urn:nnm:problem:validation",
            errors=[{"loc": ["body", "dataset_id"], "msg": "unknown dataset"}],
        )
    inputs = req.inputs.model_dump(exclude_none=True)
    try:
        params = submitted_params(req.params, gw.ctx.settings.device)
        cfg = validate_job(req.type.value, dataset, inputs, params, user, gw.ctx.jobs, gw.ctx.settings.device,
                           gw.ctx.store)
    except SpecError as exc:
        raise ApiProblem(exc.status, exc.detail, type_="urn:nnm:problem:invalid-job", errors=exc.errors) from None
    body_hash = hashlib.sha256(json.dumps(req.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
    queue = queue_for(req.type.value)
    try:
        row, created = gw.ctx.jobs.create_job(
            owner=user,
            type=req.type.value,
            dataset_id=dataset.id,
            inputs=inputs,
            params=params,
            queue=queue,
            max_attempts=gw.ctx.settings.job_max_attempts,
            idempotency_key=idempotency_key,
            request_hash=body_hash,
            max_active=limit,
            config=cfg.model_dump(mode="json"),
        )
    except TooManyJobs:
        raise ApiProblem(429, f"this API key already has {limit} queued or running jobs, its limit",
                         type_="urn:nnm:problem:too-many-jobs", headers={"Retry-After": "30"}) from None
    except IdempotencyConflict:
        raise ApiProblem(
            422,
            "Idempotency-Key was already used with a different request body",
            type_="urn:nnm:problem:idempotency-conflict",
        ) from None
    except IdempotencyInFlight as exc:
        raise ApiProblem(
            409,
            f"a request with this Idempotency-Key is still being processed (job {exc.job.id})",
            type_="urn:nnm:problem:idempotency-in-flight",
            headers={"Retry-After": "1"},
        ) from None
    if created:
        log.info("job %s submitted (%s on the %s queue)", row.id, row.type, queue, extra={"job_id": row.id})
        enqueue(gw, row.id, queue)
        row = gw.ctx.jobs.get_job(row.id)
    else:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/jobs/{row.id}"
    return _out(gw, row)


@router.get("", response_model=JobList, summary="List jobs (newest first), keyset-paginated")
def list_jobs(
    gw: Annotated[Gateway, Depends(gateway)],
    user: Annotated[str, Depends(owner)],
    status: JobStatus | None = None,
    type: JobType | None = None,
    dataset_id: str | None = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> JobList:
    rows, nxt = paged(lambda c, n: gw.ctx.jobs.list_jobs(
        user, c, n, status.value if status else None, type.value if type else None, dataset_id), cursor, limit)
    return JobList(items=[_out(gw, r) for r in rows], next_cursor=nxt)


@router.get("/{job_id}", response_model=JobOut, summary="Status, progress, metrics and artifacts of a job")
def get_job(
    job_id: str, response: Response, gw: Annotated[Gateway, Depends(gateway)], user: Annotated[str, Depends(owner)]
) -> JobOut:
    row = owned_job(gw, job_id, user)
    if JobStatus(row.status) not in TERMINAL_STATUSES:
        response.headers["Retry-After"] = "2"
    return _out(gw, row)


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobOut,
    summary="Cancel a job",
    responses={409: {"description": "The job already ended"}},
)
def cancel_job(job_id: str, gw: Annotated[Gateway, Depends(gateway)], user: Annotated[str, Depends(owner)]) -> JobOut:
    row = owned_job(gw, job_id, user)
    if JobStatus(row.status) in TERMINAL_STATUSES:
        raise ApiProblem(409, f"job '{job_id}' already ended ({row.status})", type_="urn:nnm:problem:job-ended")
    gw.ctx.jobs.request_cancel(job_id)
    return _out(gw, gw.ctx.jobs.get_job(job_id))


@router.get(
    "/{job_id}/artifacts/{name:path}",
    summary="Download an artifact (streamed, or redirected to S3)",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        307: {"description": "Redirect to a presigned S3 URL"},
    },
)
def get_artifact(
    job_id: str, name: str, gw: Annotated[Gateway, Depends(gateway)], user: Annotated[str, Depends(owner)]
) -> Response:
    owned_job(gw, job_id, user)
    art = gw.ctx.jobs.artifact(job_id, name)
    if art is None:
        raise ApiProblem(404, f"job '{job_id}' has no artifact '{name}'")
    settings = gw.ctx.settings
    if art.size > settings.stream_limit_bytes:
        url = gw.ctx.store.presign(art.key, settings.presign_expiry_s)
        if url:
            return RedirectResponse(url, status_code=307)
    media = mimetypes.guess_type(name)[0] or (
        "application/json" if name.endswith(".json") else "application/octet-stream"
    )
    chunks = gw.ctx.store.open_stream(art.key)
    filename = name.rsplit("/", 1)[-1]
    return StreamingResponse(
        chunks,
        media_type=media,
        headers={"Content-Length": str(art.size), "Content-Disposition": f'inline; filename="{filename}"'},
    )


@router.delete("/{job_id}", status_code=204, response_class=Response,
               summary="Delete a finished job with its artifacts and model",
               responses={409: {"description": "The job is queued or running, or an active job uses it"}})
def delete_job(job_id: str, gw: Annotated[Gateway, Depends(gateway)], user: Annotated[str, Depends(owner)]) -> Response:
    outcome, row, users = gw.ctx.jobs.delete_job(job_id, user)
    if outcome == "active":
        raise ApiProblem(409, f"job '{job_id}' is {row.status}; cancel it first", type_="urn:nnm:problem:job-active")
    check_deleted(outcome, "job", job_id, users)
    if row is not None and row.model_id:
        gw.models.evict(row.model_id)
    gw.galleries.evict(job_id)
    remove_files(gw.ctx, f"jobs/{job_id}/")
    return Response(status_code=204)
