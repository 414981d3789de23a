"""Deleting what users asked to delete, and what the retention setting says has expired.

Records go first (in one transaction, owner-checked, refusing what a queued or running job still
needs), files second: a failure in between leaves unreferenced files, never records that point at
missing files. The retention sweep also removes such leftovers under a job's prefix.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from ..context import ServiceContext
from .db import utcnow
from .storage import StorageError

log = logging.getLogger("nnm.retention")

#: Artifacts a job keeps after its retention period: its metrics (the model under `model/` stays too).
KEEP_AFTER_EXPIRY = ("metrics.json",)


def remove_files(ctx: ServiceContext, prefix: str) -> None:
    """Delete every stored object under `prefix`; a store outage is logged, not raised (the records
    are already gone, and the next retention sweep finds the leftovers)."""
    try:
        ctx.store.delete_prefix(prefix)
    except StorageError as exc:
        log.warning("could not delete %s yet (%s)", prefix, exc)


def sweep_once(ctx: ServiceContext) -> list[str]:
    """Expire the artifacts of jobs that finished more than `artifact_retention_days` ago; returns their ids."""
    days = ctx.settings.artifact_retention_days
    if days <= 0:
        return []
    expired = ctx.jobs.expire_artifacts(utcnow() - timedelta(days=days), keep=KEEP_AFTER_EXPIRY)
    for job_id in expired:
        kept = {a.key for a in ctx.jobs.artifacts(job_id)}
        try:
            for key in ctx.store.list(f"jobs/{job_id}/"):
                if key not in kept:
                    ctx.store.delete(key)
        except StorageError as exc:
            log.warning("retention: files of job %s not deleted yet (%s)", job_id, exc)
    if expired:
        log.info("retention: expired the artifacts of %d job(s)", len(expired))
    return expired


class RetentionSweeper(threading.Thread):
    """Runs `sweep_once` every `interval_s` in the gateway (harmless when several replicas do)."""

    def __init__(self, ctx: ServiceContext, interval_s: float = 3600.0):
        super().__init__(name="nnm-retention", daemon=True)
        self.ctx, self.interval_s = ctx, interval_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                sweep_once(self.ctx)
            except Exception as exc:  # an outage of the database or store: try again next time
                log.warning("retention sweep failed (%s)", exc)

    def stop(self) -> None:
        self.stopped.set()
