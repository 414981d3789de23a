"""Job queues behind one interface: Celery over Redis, or worker threads in this process (embedded).

Either way a queued message only carries the job id; the job store decides what runs.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
    def broker_messages(self) -> BrokerMessages | None: ...
    def ping(self) -> None: ...
    def close(self) -> None: ...


@dataclass
class BrokerMessages:
    """What the broker holds: jobs with a message waiting in a queue, and the last time (unix seconds)
    a worker received a message, not yet acknowledged, for each job."""

    waiting: set[str]
    delivered_at: dict[str, float]


def _job_ids(raw: bytes | str) -> set[str]:
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    return {"job_" + part[:32] for part in text.split("job_")[1:]}


class CeleryQueue:
    """Publishes `nnm.run_job(job_id)` to the named Celery queue."""

    def __init__(self, broker_url: str):
        from .worker.celery_app import make_celery

        self.app = make_celery(broker_url)

    def enqueue(self, job_id: str, queue: str, delay_s: float = 0) -> None:
        self.app.send_task(TASK_NAME, args=[job_id], queue=queue, countdown=delay_s or None)

    def pending_job_ids(self) -> set[str] | None:
        """Ids of jobs with a message in the broker (waiting or delivered but unacknowledged).

        None when the broker cannot be inspected; the reconciler then trusts its records.
        """
        messages = self.broker_messages()
        return None if messages is None else messages.waiting | set(messages.delivered_at)

    def broker_messages(self) -> BrokerMessages | None:
        """The jobs with a message waiting in a queue, and when a worker last received one for each job
        whose message is delivered but not yet acknowledged (kombu's `unacked` hash, whose index holds
        the delivery times). None when the broker cannot be inspected."""
        try:
            with self.app.connection_for_read() as conn:
                client = conn.default_channel.client
                waiting: set[str] = set()
                for queue in QUEUES:
                    for raw in client.lrange(queue, 0, -1):
                        waiting |= _job_ids(raw)
                delivered_at: dict[str, float] = {}
                times = dict(client.zrange("unacked_index", 0, -1, withscores=True))
                tags = list(times)
                for tag, raw in zip(tags, client.hmget("unacked", tags) if tags else [], strict=True):
                    for job_id in _job_ids(raw or b""):
                        delivered_at[job_id] = max(delivered_at.get(job_id, 0.0), float(times[tag]))
        except Exception:
            return None
        return BrokerMessages(waiting, delivered_at)

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
        from .worker.runner import ShutdownRequested, execute_job

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

    def broker_messages(self) -> BrokerMessages | None:
        return None

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
