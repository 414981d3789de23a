"""The Celery application of the workers: `celery -A nnm.service.worker.celery_app worker -Q gpu`.

Configured for long jobs: late acks and requeue when a worker process is lost, one message at a time,
one task per pool process, JSON only, and a broker visibility timeout above the hard time limit so
a long job is not delivered twice while it runs. Postgres, not the broker, says whether a job runs:
a redelivered message for a finished job, or for a running job with a fresh heartbeat, is a no-op.

That is why a running task survives a lost broker connection (a Redis restart or a network blip):
the runner watches its training child and writes heartbeats to Postgres, neither needs the broker,
and the late acknowledgement goes over the new connection. Cancelling the task instead would kill
its training and cost the job an attempt for nothing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from celery import Celery
from celery.signals import worker_init, worker_ready, worker_shutting_down

from ..queue import DEFER_S, QUEUES, TASK_NAME
from ..settings import load_settings

log = logging.getLogger("nnm.worker")


def make_celery(broker_url: str | None = None) -> Celery:
    settings = load_settings()
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    broker = broker_url or settings.broker_url
    # The runner enforces the job's own time limit; Celery's limits are a backstop just above it.
    hard = settings.job_time_limit_s + 300
    transport = {
        "visibility_timeout": hard + 3600,
        # Sweep for abandoned messages every 2 s instead of about 100 s.
        "unacked_restore_interval": 2,
        "unacked_restore_throttle": 1,
    }
    app = Celery("nnm", broker=broker)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        # Pool processes are kept between jobs: each holds the fork server its jobs' children are forked
        # from (worker/forkserver.py), and a new pool process would itself spend seconds importing.
        worker_max_tasks_per_child=None,
        task_time_limit=hard,
        task_soft_time_limit=max(60, hard - 60),
        task_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue="gpu",
        task_create_missing_queues=True,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        # A broker blip must not kill running training (see the module docstring); a message the
        # broker hands out again meanwhile is a no-op for a job whose heartbeat is fresh.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_soft_shutdown_timeout=10.0,
        worker_hijack_root_logger=False,
    )
    app.conf.task_queues = None
    app.conf.task_routes = {TASK_NAME: {"queue": "gpu"}}

    @app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
    def run_job(self, job_id: str) -> str | None:
        from ..context import ServiceContext
        from .runner import ShutdownRequested, execute_job

        ctx = ServiceContext.from_settings()
        queue = (self.request.delivery_info or {}).get("routing_key") or "gpu"
        queue = queue if queue in QUEUES else "gpu"
        # The pool process runs the task; its parent (the worker's main process) raises this flag on
        # SIGTERM, and the runner then hands the job back instead of letting it vanish.
        stop = ShutdownFlag(shutdown_flag_path(settings.work_dir, os.getppid()))
        try:
            status = execute_job(ctx, job_id, stop)
        except ShutdownRequested:
            status = "queued"
        finally:
            ctx.close()
        if status == "queued":  # handed back (worker stopping, or its child crashed): publish it again
            app.send_task(TASK_NAME, args=[job_id], queue=queue)
        elif status == "deferred":  # its owner already runs as many jobs as allowed: try again shortly
            app.send_task(TASK_NAME, args=[job_id], queue=queue, countdown=DEFER_S)
        return status

    return app


def shutdown_flag_path(work_dir: Path, worker_pid: int) -> Path:
    return work_dir / f".shutdown-{worker_pid}"


class ShutdownFlag:
    """Duck-typed like threading.Event: set when the worker's main process is shutting down."""

    def __init__(self, path: Path):
        self.path = path

    def is_set(self) -> bool:
        return self.path.exists()


@worker_init.connect
def _set_up_logs_and_metrics(**_: object) -> None:
    """In the worker's main process, before the pool forks: log format, and the directory where every
    process of this worker writes its metrics (children inherit both)."""
    from ..logs import configure_logging
    from .metrics import prepare_multiprocess_dir

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format, "worker")
    if settings.worker_metrics_port:
        prepare_multiprocess_dir(settings.work_dir, os.getpid())


@worker_ready.connect
def _serve_metrics(**_: object) -> None:
    settings = load_settings()
    if settings.worker_metrics_port:
        from ..store.repository import JobStore
        from .metrics import serve_metrics

        serve_metrics(settings.worker_metrics_port, JobStore(settings.resolved_database_url))


@worker_ready.connect
def _clear_shutdown_flag(**_: object) -> None:
    settings = load_settings()
    shutdown_flag_path(settings.work_dir, os.getpid()).unlink(missing_ok=True)


@worker_ready.connect
def _start_liveness_beat(**_: object) -> None:
    """The liveness probe reads this file's age (nnm.service.worker.liveness), not the broker."""
    from .liveness import LivenessBeat, heartbeat_path

    LivenessBeat(heartbeat_path(load_settings().work_dir)).start()


@worker_shutting_down.connect
def _raise_shutdown_flag(sig: str | None = None, how: str | None = None, **_: object) -> None:
    """SIGTERM (warm shutdown) or SIGQUIT: tell running jobs to hand themselves back."""
    settings = load_settings()
    path = shutdown_flag_path(settings.work_dir, os.getpid())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    log.warning("worker shutting down (%s, %s): running jobs are handed back to the queue", sig, how)


app = make_celery()
