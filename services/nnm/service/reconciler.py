"""Postgres is the truth: re-publish jobs the broker does not know about.

- queued jobs never published (the broker was down when they were created);
- running or cancelling jobs whose heartbeat stopped (their worker died): a new message lets another
  worker take them over from their last checkpoint, or fail them past the attempt limit.
"""

from __future__ import annotations

import logging
import threading

from .context import ServiceContext
from .db import utcnow
from .queue import JobQueue
from .retry import is_transient

log = logging.getLogger("nnm.reconciler")


def reconcile_once(ctx: ServiceContext, queue: JobQueue, republish_after_s: float | None = None) -> list[str]:
    """One pass; returns the ids of the jobs it published again.

    Queued jobs are published again when they never were, when the broker no longer holds their
    message (a broker that lost its data), or, with `republish_after_s`, when they waited that long.
    """
    timeout = ctx.settings.heartbeat_timeout_s
    stale = ctx.jobs.stale_jobs(timeout)
    pending = queue.pending_job_ids() if any(j.status == "queued" for j in stale) else None
    published = []
    for job in stale:
        if job.status == "queued" and job.enqueued_at is not None:
            age = (utcnow() - job.enqueued_at).total_seconds()
            vanished = pending is not None and job.id not in pending
            if not vanished and (republish_after_s is None or age < republish_after_s):
                continue
        try:
            queue.enqueue(job.id, job.queue)
            ctx.jobs.mark_enqueued(job.id)
            ctx.jobs.event(job.id, "republished", {"status": job.status})
            published.append(job.id)
        except Exception as exc:
            log.warning("reconciler: cannot publish job %s yet (%s)", job.id, exc)
            break
    return published


class Reconciler(threading.Thread):
    """Runs `reconcile_once` every `interval_s` until stopped."""

    def __init__(self, ctx: ServiceContext, queue: JobQueue, interval_s: float = 15.0):
        super().__init__(name="nnm-reconciler", daemon=True)
        self.ctx, self.queue, self.interval_s = ctx, queue, interval_s
        self.stopped = threading.Event()

    def run(self) -> None:
        import time

        reachable_since: float | None = None
        while not self.stopped.wait(self.interval_s):
            try:
                self.ctx.jobs.ping()
            except Exception:
                reachable_since = None  # heartbeats could not be written meanwhile: trust none of them
                continue
            now = time.monotonic()
            reachable_since = reachable_since or now
            # Right after a database outage every heartbeat looks stale; wait one heartbeat timeout so
            # live workers can refresh theirs before any job is taken over.
            if now - reachable_since < self.ctx.settings.heartbeat_timeout_s:
                continue
            try:
                reconcile_once(self.ctx, self.queue)
            except Exception as exc:
                if not is_transient(exc):
                    log.exception("reconciler pass failed")
                    continue
                # The database went away between the ping and the pass: an outage, not a bug.
                log.warning("reconciler: database unreachable, pass skipped (%s)",
                            type(getattr(exc, "orig", exc)).__name__)
                reachable_since = None

    def stop(self) -> None:
        self.stopped.set()
