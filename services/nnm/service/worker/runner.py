"""Runs one job on a worker: claim it, start its child process, watch it, record the outcome.

The same function serves the Celery task and the embedded in-process queue.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError

from api_schemas import JobStatus

from ..context import ServiceContext
from ..logs import job_context
from ..retry import is_transient, retry_db
from ..store.storage import StorageError
from .child import EXIT_CANCELLED, EXIT_LOST, EXIT_OK, attempt_dir
from .forkserver import fork_servers, start_fresh
from .metrics import enabled as metrics_enabled
from .metrics import worker_metrics

log = logging.getLogger("nnm.worker")


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def _kill_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the child's process group, then SIGKILL after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def running_limit(ctx: ServiceContext, job_id: str) -> int | None:
    """How many jobs the owner of `job_id` may run at once (None: no limit, for anonymous use)."""
    from ..store.db import ApiKeyRow

    job = ctx.jobs.get_job(job_id)
    if job is None or job.owner == "public":
        return None
    with ctx.jobs.session() as s:
        key = s.get(ApiKeyRow, job.owner)
    return (key.max_running_jobs if key and key.max_running_jobs else None) or ctx.settings.default_max_running_jobs


class ShutdownRequested(Exception):
    """The worker is stopping; the job was handed back to the queue."""


#: The outcome an attempt's final status counts as in the worker metrics (None: another worker owns it).
OUTCOMES = {"succeeded": "succeeded", "failed": "failed", "cancelled": "cancelled", "queued": "requeued",
            None: "lost"}


def execute_job(ctx: ServiceContext, job_id: str, stop: threading.Event | Any | None = None) -> str | None:
    """Run `job_id` to a terminal state (or hand it back when `stop` is set). Returns the final status.

    Records logged meanwhile carry the job's id; a worker with metrics counts the attempt and its outcome.
    """
    started: dict[str, Any] = {}  # the attempt's queue and type, once this worker has claimed it
    status: str | None = "queued"  # what a ShutdownRequested (handed back) counts as
    t0 = time.monotonic()
    with job_context(job_id):
        try:
            status = _execute(ctx, job_id, stop, started)
            return status
        finally:
            if started and metrics_enabled():
                m = worker_metrics()
                outcome = OUTCOMES.get(status, "failed")
                m.jobs_finished.labels(started["queue"], started["type"], outcome).inc()
                m.job_seconds.labels(started["type"], outcome).observe(time.monotonic() - t0)


def _execute(ctx: ServiceContext, job_id: str, stop: Any, started: dict[str, Any]) -> str | None:
    settings = ctx.settings
    name = worker_name()
    limit = retry_db(lambda: running_limit(ctx, job_id), f"limits of {job_id}")
    claim = retry_db(lambda: ctx.jobs.claim(job_id, name, settings.heartbeat_timeout_s, limit), f"claim {job_id}")
    if claim.reason == "owner at its running limit":
        return "deferred"
    if claim.attempt is None:
        log.info("job %s not started: %s", job_id, claim.reason)
        return claim.job.status if claim.job else None
    attempt = claim.attempt
    if claim.job is not None:
        started.update(queue=claim.job.queue, type=claim.job.type)
        if metrics_enabled():
            worker_metrics().jobs_started.labels(claim.job.queue, claim.job.type).inc()
            worker_metrics().attempt.labels(claim.job.queue).observe(attempt)
    workdir = settings.work_dir / job_id
    # The attempt's own directory: a worker on this machine that lost the job (cut off from Postgres)
    # may still be writing in an older attempt's. This one resumes from the store, not from that.
    own = attempt_dir(workdir, attempt)
    shutil.rmtree(own, ignore_errors=True)
    own.mkdir(parents=True, exist_ok=True)
    log.info("job %s attempt %d starting", job_id, attempt)
    env = dict(os.environ)
    env["NNM_DATA_DIR"] = str(settings.data_dir.resolve())
    env["NNM_PARENT_PID"] = str(os.getpid())
    # Built-in datasets download once per worker into its cache, not next to the job store.
    env["NNM_DATASETS_DIR"] = str((settings.datasets_dir or settings.cache_dir / "datasets").resolve())
    # Large sets are decoded once per worker machine and memory-mapped by every job on them, in bounds.
    env["NNM_CACHE_DIR"] = str(settings.decoded_dir.resolve())
    env["NNM_CACHE_MAX_BYTES"] = str(settings.decoded_cache_max_bytes)
    args = [job_id, str(attempt), str(workdir)]
    if settings.processes_per_job > 1:  # one process per GPU, started by torchrun (see worker/launch.py)
        proc = start_fresh("nnm.service.worker.launch", [str(settings.processes_per_job), *args], env,
                           workdir / "child.log")
    else:  # forked from this thread's fork server, which imported torch once (worker/forkserver.py)
        proc = fork_servers.start_job(args, env, workdir / "child.log", use_server=settings.fork_server)
    cancel_seen: float | None = None
    last_beat = 0.0
    started = time.monotonic()
    while proc.poll() is None:
        time.sleep(0.5)
        if time.monotonic() - started > settings.job_time_limit_s:
            _kill_group(proc, settings.cancel_grace_s)
            error = {"type": "urn:nnm:problem:time-limit", "title": "Time limit exceeded", "status": 500,
                     "detail": f"the job ran longer than the limit of {settings.job_time_limit_s} s"}
            retry_db(lambda e=error: ctx.jobs.finish(job_id, attempt, JobStatus.failed.value, error=e), "finish")
            shutil.rmtree(workdir, ignore_errors=True)
            return JobStatus.failed.value
        if stop is not None and stop.is_set():
            _kill_group(proc, settings.cancel_grace_s)
            retry_db(lambda: ctx.jobs.release(job_id, attempt, "worker shutting down"), f"release {job_id}")
            shutil.rmtree(own, ignore_errors=True)
            raise ShutdownRequested(job_id)
        if time.monotonic() - last_beat < 5.0:
            continue
        last_beat = time.monotonic()
        try:
            status = ctx.jobs.heartbeat(job_id, attempt)
        except DBAPIError as exc:
            if not is_transient(exc):
                raise
            log.warning("job %s: heartbeat skipped, database unreachable", job_id)
            continue
        if status is None:  # another worker owns the job now
            _kill_group(proc, 0)
            shutil.rmtree(own, ignore_errors=True)
            return None
        if status == JobStatus.cancelling.value:
            cancel_seen = cancel_seen or time.monotonic()
            if time.monotonic() - cancel_seen > settings.cancel_grace_s:
                _kill_group(proc, settings.cancel_grace_s)
    code = proc.returncode
    try:
        return retry_db(lambda: _finish(ctx, job_id, attempt, code, workdir), f"record the outcome of {job_id}",
                        timeout_s=3600)
    finally:
        shutil.rmtree(own, ignore_errors=True)  # the child has exited; a next attempt restores from the store


#: The output that proves each job type finished (uploaded last by the child).
PROOF = {"pretext": "pretext/done.json", "mine": "mine/done.json", "cluster": "metrics.json",
         "selflabel": "metrics.json", "evaluate": "metrics.json", "pipeline": "metrics.json"}


def _outputs_present(ctx: ServiceContext, job_id: str, job_type: str) -> bool:
    """No job is marked succeeded whose artifacts are missing from the store (where its rows point)."""
    row = ctx.jobs.artifact(job_id, PROOF[job_type])
    try:
        return row is not None and ctx.store.exists(row.key)
    except StorageError:
        return False


def _finish(ctx: ServiceContext, job_id: str, attempt: int, code: int, workdir: Path) -> str | None:
    result = {}
    if (attempt_dir(workdir, attempt) / "result.json").exists():
        result = json.loads((attempt_dir(workdir, attempt) / "result.json").read_text())
    job = ctx.jobs.get_job(job_id)
    if code == EXIT_LOST or job is None or job.attempt != attempt:
        return None
    if code == EXIT_OK and result.get("status") == "succeeded" and not _outputs_present(ctx, job.id, job.type):
        result = {"status": "failed", "retry": True, "error": {
            "type": "urn:nnm:problem:storage-unavailable", "title": "Artifacts missing", "status": 503,
            "detail": "the job's outputs are not all in the artifact store"}}
        code = 1
    if code == EXIT_OK and result.get("status") == "succeeded":
        ctx.jobs.finish(
            job_id, attempt, JobStatus.succeeded.value, metrics=result.get("metrics"), model_id=result.get("model_id")
        )
    elif code == EXIT_CANCELLED or job.status == JobStatus.cancelling.value:
        ctx.jobs.finish(job_id, attempt, JobStatus.cancelled.value)
    elif result.get("status") == "failed" and not result.get("retry"):
        ctx.jobs.finish(job_id, attempt, JobStatus.failed.value, error=result["error"])
    elif attempt < job.max_attempts:
        # A crash (killed child, lost storage): back to the queue to resume from the last checkpoint.
        ctx.jobs.release(job_id, attempt, f"child exited with status {code}")
        return JobStatus.queued.value
    else:
        error = result.get("error") or {
            "type": "urn:nnm:problem:worker-lost",
            "title": "Job crashed",
            "status": 500,
            "detail": f"the job's process stopped unexpectedly {attempt} times (exit status {code})",
        }
        ctx.jobs.finish(job_id, attempt, JobStatus.failed.value, error=error)
    final = ctx.jobs.get_job(job_id)
    if final is not None and final.status in {"succeeded", "failed", "cancelled"}:
        shutil.rmtree(workdir, ignore_errors=True)
    return final.status if final else None
