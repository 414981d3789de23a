"""Job queues behind one interface: Celery over Redis, or worker threads in this process (embedded).

Either way a queued message only carries the job id; the job store decides what runs.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from .context import ServiceContext

log = logging.getLogger("nnm.queue")

QUEUES = ("gpu", "cpu")
#: Seconds before a job held back by its owner's running limit is tried again.
DEFER_S = 10.0
TASK_NAME = "nnm.run_job"


class JobQueue(Protocol):
    def enqueue(self, job_id: str, queue: str, delay_s: float = 0) -> None: ...
    def pending_job_ids(self) -> set[str] | None: ...
    def ping(self) -> None: ...
    def close(self) -> None: ...


class CeleryQueue:
    """Publishes `nnm.run_job(job_id)` to the named Celery queue."""

    def __init__(self, broker_url: str):
        from .celery_app import make_celery

        self.app = make_celery(broker_url)

    def enqueue(self, job_id: str, queue: str, delay_s: float = 0) -> None:
        self.app.send_task(TASK_NAME, args=[job_id], queue=queue, countdown=delay_s or None)

    def pending_job_ids(self) -> set[str] | None:
        """Ids of jobs with a message in the broker (waiting or delivered but unacknowledged).

        None when the broker cannot be inspected; the reconciler then trusts its records.
        """
        try:
            with self.app.connection_for_read() as conn:
                client = conn.default_channel.client
                raw: list[bytes] = []
                for queue in QUEUES:
                    raw += client.lrange(queue, 0, -1)
                raw += list(client.hvals("unacked"))
        except Exception:
            return None
        ids = set()
        for item in raw:
            text = item.decode(errors="replace") if isinstance(item, bytes) else str(item)
            for part in text.split("job_")[1:]:
                ids.add("job_" + part[:32])
        return ids

    def ping(self) -> None:
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
            conn.default_channel.client.ping()

    def close(self) -> None:
        pass


class LocalQueue:
    """Runs jobs on threads of this process, one pool per queue (embedded mode).

    Each job still trains in its own child process; the thread only watches it.
    """

    def __init__(self, ctx: ServiceContext):
        from .runner import ShutdownRequested, execute_job

        self.ctx = ctx
        self._execute, self._shutdown_exc = execute_job, ShutdownRequested
        s = ctx.settings
        self.pools = {
            "gpu": ThreadPoolExecutor(s.embedded_gpu_slots, thread_name_prefix="nnm-gpu"),
            "cpu": ThreadPoolExecutor(s.embedded_cpu_slots, thread_name_prefix="nnm-cpu"),
        }
        self.stop = threading.Event()

    def enqueue(self, job_id: str, queue: str, delay_s: float = 0) -> None:
        if delay_s > 0:
            timer = threading.Timer(delay_s, self.enqueue, args=(job_id, queue))
            timer.daemon = True
            timer.start()
            return
        self.pools.get(queue, self.pools["gpu"]).submit(self._run, job_id, queue)

    def _run(self, job_id: str, queue: str) -> None:
        try:
            status = self._execute(self.ctx, job_id, self.stop)
        except self._shutdown_exc:
            return
        except Exception:
            log.exception("job %s: runner failed", job_id)
            return
        if self.stop.is_set():
            return
        if status == "queued":  # handed back after a crash: run it again
            self.enqueue(job_id, queue)
        elif status == "deferred":  # its owner runs as many jobs as allowed: try again shortly
            self.enqueue(job_id, queue, DEFER_S)

    def pending_job_ids(self) -> set[str] | None:
        return None  # the in-process queue is rebuilt from the job store at start-up

    def ping(self) -> None:
        if self.stop.is_set():
            raise RuntimeError("the embedded queue is shutting down")

    def close(self) -> None:
        self.stop.set()
        for pool in self.pools.values():
            pool.shutdown(wait=True, cancel_futures=True)


def make_queue(ctx: ServiceContext) -> JobQueue:
    if ctx.settings.broker_url:
        return CeleryQueue(ctx.settings.broker_url)
    return LocalQueue(ctx)
