"""The Celery application of the workers: `celery -A nnm.service.celery_app worker -Q gpu`.

Configured for long jobs: late acks and requeue when a worker process is lost, one message at a time,
one task per pool process, JSON only, and a broker visibility timeout above the hard time limit so
a long job is not delivered twice while it runs. Postgres, not the broker, says whether a job runs:
a redelivered message for a finished or running job is a no-op.
"""

from __future__ import annotations

import logging

from celery import Celery

from .queue import QUEUES, TASK_NAME
from .settings import load_settings

log = logging.getLogger("nnm.worker")


def make_celery(broker_url: str | None = None) -> Celery:
    settings = load_settings()
    broker = broker_url or settings.broker_url
    hard = settings.job_time_limit_s
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
        worker_max_tasks_per_child=1,
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
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_soft_shutdown_timeout=10.0,
        worker_hijack_root_logger=False,
    )
    app.conf.task_queues = None
    app.conf.task_routes = {TASK_NAME: {"queue": "gpu"}}

    @app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
    def run_job(self, job_id: str) -> str | None:
        from .context import ServiceContext
        from .runner import execute_job

        ctx = ServiceContext.from_settings()
        try:
            status = execute_job(ctx, job_id)
            if status == "queued":  # handed back after a crash of its child: queue it again
                queue = self.request.delivery_info.get("routing_key") or "gpu"
                app.send_task(TASK_NAME, args=[job_id], queue=queue if queue in QUEUES else "gpu")
            return status
        finally:
            ctx.close()

    return app


app = make_celery()
