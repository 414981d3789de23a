"""Postgres is the truth: re-publish jobs the broker does not know about.

- queued jobs never published (the broker was down when they were created), or whose message the
  broker lost;
- running or cancelling jobs whose heartbeat stopped (their worker died): a new message lets another
  worker take them over from their last checkpoint, or fail them past the attempt limit.

Every gateway replica runs a reconciler, every pass sees the same stale jobs: a job is published
again only when the broker holds no live message for it, and only by the replica that wins a
compare-and-set of its `enqueued_at` (`JobStore.take_republish`), so N passes of any number of
replicas leave at most one message per job.
"""

from __future__ import annotations

import logging
import threading

from ..context import ServiceContext
from ..queue import DEFER_S, BrokerMessages, JobQueue
from ..retry import is_transient
from ..store.db import JobRow, utcnow

log = logging.getLogger("nnm.reconciler")

#: Seconds a new job without `enqueued_at` is left to the gateway that created it and is publishing it.
PUBLISH_GRACE_S = 5.0


def reconcile_once(ctx: ServiceContext, queue: JobQueue, republish_after_s: float | None = None) -> list[str]:
    """One pass; returns the ids of the jobs it published again.

    Queued jobs are published again when they never were, or when the broker no longer holds a live
    message for them (a broker that lost its data, a worker that died holding it). Running jobs with
    a stale heartbeat are published again when no live message is left for them, at most once per
    heartbeat timeout. `republish_after_s` is for a queue that cannot be inspected (the in-process
    queue, empty after a restart): jobs that waited that long are published again.
    """
    timeout = ctx.settings.heartbeat_timeout_s
    stale = ctx.jobs.stale_jobs(timeout)
    if not stale:
        return []
    inspect = getattr(queue, "broker_messages", None)
    messages = inspect() if inspect is not None else None
    now = utcnow()
    published = []
    for job in stale:
        if messages is not None and _has_live_message(job, messages, now.timestamp(), timeout):
            continue  # a worker will get it, or has just got it
        if job.status == "queued":
            if job.enqueued_at is None:
                if (now - job.created_at).total_seconds() < PUBLISH_GRACE_S:
                    continue
            elif messages is None and (republish_after_s is None
                                       or (now - job.enqueued_at).total_seconds() < republish_after_s):
                continue  # the broker cannot tell whether its message is there: trust it is
        else:
            gap = timeout if republish_after_s is None else republish_after_s
            if job.enqueued_at is not None and (now - job.enqueued_at).total_seconds() < gap:
                continue  # published again recently: that message may still be on its way to a worker
        taken = ctx.jobs.take_republish(job)
        if taken is None:
            continue  # another replica's reconciler published it, or a worker claimed it meanwhile
        try:
            queue.enqueue(job.id, job.queue)
        except Exception as exc:
            ctx.jobs.release_republish(job.id, taken, job.enqueued_at)
            log.warning("reconciler: cannot publish job %s yet (%s)", job.id, exc)
            break
        ctx.jobs.event(job.id, "republished", {"status": job.status})
        published.append(job.id)
    return published


def _has_live_message(job: JobRow, messages: BrokerMessages, now: float, timeout_s: float) -> bool:
    """Whether the broker holds a message for `job` that a worker will act on.

    A waiting message will be delivered. A delivered one is live when a worker received it after the
    job's last heartbeat (that worker claims the job at once, or holds the message `DEFER_S` when its
    owner is at the running limit) and recently. A message the job's own worker received before its
    heartbeat stopped, or one held longer than that, belongs to a worker that died with it: it stays
    unacknowledged until the visibility timeout (days) and runs nowhere before then.
    """
    if job.id in messages.waiting:
        return True
    at = messages.delivered_at.get(job.id)
    if at is None:
        return False
    after_heartbeat = job.heartbeat_at is None or at > job.heartbeat_at.timestamp()
    return after_heartbeat and now - at < max(timeout_s, 2 * DEFER_S)


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
