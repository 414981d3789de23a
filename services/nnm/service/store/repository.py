"""Job store operations. Postgres (or SQLite) is the source of truth for jobs.

Every state transition is a conditional UPDATE (compare-and-set on status and attempt), so two
workers can never both own a job and a late write from a lost worker cannot overwrite a newer one.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from api_schemas import TERMINAL_STATUSES, JobStatus

from .db import ArtifactRow, DatasetRow, EventRow, JobRow, ModelRow, make_engine, make_sessionmaker, new_id, utcnow

ACTIVE = (JobStatus.queued.value, JobStatus.running.value, JobStatus.cancelling.value)
TERMINAL = tuple(s.value for s in TERMINAL_STATUSES)


class IdempotencyConflict(Exception):
    """Same Idempotency-Key with another request body."""


class TooManyJobs(Exception):
    """The owner already has as many queued or running jobs as allowed."""

    def __init__(self, limit: int):
        super().__init__(f"limit of {limit} queued or running jobs reached")
        self.limit = limit


class IdempotencyInFlight(Exception):
    """Same Idempotency-Key and body while the first job is still queued or running."""

    def __init__(self, job: JobRow):
        self.job = job


@dataclass
class Claim:
    """Result of trying to start a job: `attempt` is set when this worker now owns it."""

    attempt: int | None
    reason: str
    job: JobRow | None = None


def encode_cursor(created_at: datetime, row_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at.isoformat(), row_id]).encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        at, row_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return datetime.fromisoformat(at), str(row_id)
    except (ValueError, TypeError, json.JSONDecodeError):
        raise ValueError("cursor is not one this API returned") from None


class JobStore:
    """All reads and writes of datasets, jobs, artifacts, models and job events."""

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self.sessions: sessionmaker = make_sessionmaker(self.engine)
        self._local_lock = threading.RLock()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions() as s, s.begin():
            yield s

    @contextmanager
    def owner_lock(self, purpose: str, owner: str) -> Iterator[Session]:
        """A transaction holding an exclusive lock on (`purpose`, `owner`) until it ends, so a
        count-then-insert limit holds under concurrent requests from any number of gateways.

        Postgres: a transaction-scoped advisory lock. SQLite (embedded, one process): a process lock,
        and the database serialises writers anyway.
        """
        with self.sessions() as s, s.begin():
            if s.bind.dialect.name == "postgresql":
                s.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": f"{purpose}:{owner}"})
                yield s
            else:
                with self._local_lock:
                    yield s

    def ping(self) -> None:

        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ datasets

    def add_dataset(self, **fields: Any) -> DatasetRow:
        row = DatasetRow(id=fields.pop("id", None) or new_id("ds"), **fields)
        with self.session() as s:
            s.add(row)
        return row

    def get_dataset(self, dataset_id: str, owner: str | None = None) -> DatasetRow | None:
        """A dataset; with `owner` (API callers) only theirs and not deleted."""
        with self.session() as s:
            row = s.get(DatasetRow, dataset_id)
            if row is None or (owner is not None and (row.owner != owner or row.deleted_at is not None)):
                return None
            return row

    def list_datasets(self, owner: str, cursor: str | None, limit: int) -> tuple[list[DatasetRow], str | None]:
        return self._page(DatasetRow, [DatasetRow.owner == owner, DatasetRow.deleted_at.is_(None)], cursor, limit)

    def _page(self, model: Any, filters: list, cursor: str | None, limit: int) -> tuple[list, str | None]:
        query = select(model).where(*filters)
        if cursor:
            at, row_id = decode_cursor(cursor)
            query = query.where(or_(model.created_at < at, and_(model.created_at == at, model.id < row_id)))
        query = query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)
        with self.session() as s:
            rows = list(s.scalars(query))
        nxt = encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id) if len(rows) > limit else None
        return rows[:limit], nxt

    # ------------------------------------------------------------------ jobs

    def create_job(
        self,
        *,
        owner: str,
        type: str,
        dataset_id: str,
        inputs: dict,
        params: dict,
        queue: str,
        max_attempts: int,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        max_active: int | None = None,
        config: dict | None = None,
    ) -> tuple[JobRow, bool]:
        """Insert a queued job; returns (job, created). An Idempotency-Key replays the first job.

        With `max_active`, a new job is refused (`TooManyJobs`) while the owner already has that many
        queued or running jobs: counted and inserted under the owner's lock, so concurrent requests
        cannot overshoot, and a fresh Idempotency-Key per request does not skip it (only a replay does).
        """
        if idempotency_key:
            existing = self._by_idempotency_key(owner, idempotency_key)
            if existing is not None:
                return self._replay(existing, request_hash), False
        now = utcnow()
        row = JobRow(
            id=new_id("job"),
            owner=owner,
            type=type,
            status=JobStatus.queued.value,
            dataset_id=dataset_id,
            inputs=inputs,
            params=params,
            queue=queue,
            attempt=0,
            max_attempts=max_attempts,
            stages=[],
            idempotency_key=idempotency_key,
            request_hash=request_hash,
            config=config,
            created_at=now,
            updated_at=now,
        )
        try:
            with self.owner_lock("jobs", owner) as s:
                dataset = s.get(DatasetRow, dataset_id)
                if dataset is None or dataset.deleted_at is not None:  # deleted since the request was checked
                    raise LookupError(f"no dataset '{dataset_id}'")
                if max_active is not None:
                    active = s.scalar(select(func.count()).select_from(JobRow).where(
                        JobRow.owner == owner, JobRow.status.in_(ACTIVE)))
                    if active >= max_active:
                        raise TooManyJobs(max_active)
                s.add(row)
                s.flush()  # the event row references the job
                s.add(EventRow(job_id=row.id, kind="created", detail=None))
        except IntegrityError:
            existing = self._by_idempotency_key(owner, idempotency_key or "")
            if existing is None:
                raise
            return self._replay(existing, request_hash), False
        return row, True

    def _by_idempotency_key(self, owner: str, key: str) -> JobRow | None:
        with self.session() as s:
            return s.scalar(select(JobRow).where(JobRow.owner == owner, JobRow.idempotency_key == key))

    @staticmethod
    def _replay(existing: JobRow, request_hash: str | None) -> JobRow:
        if existing.request_hash != request_hash:
            raise IdempotencyConflict()
        if existing.status in ACTIVE and existing.attempt == 0 and existing.enqueued_at is None:
            raise IdempotencyInFlight(existing)
        return existing

    def get_job(self, job_id: str, owner: str | None = None) -> JobRow | None:
        with self.session() as s:
            row = s.get(JobRow, job_id)
            return row if row is not None and (owner is None or row.owner == owner) else None

    def list_jobs(
        self,
        owner: str,
        cursor: str | None,
        limit: int,
        status: str | None = None,
        type: str | None = None,
        dataset_id: str | None = None,
    ) -> tuple[list[JobRow], str | None]:
        filters = [JobRow.owner == owner]
        if status:
            filters.append(JobRow.status == status)
        if type:
            filters.append(JobRow.type == type)
        if dataset_id:
            filters.append(JobRow.dataset_id == dataset_id)
        return self._page(JobRow, filters, cursor, limit)

    def mark_enqueued(self, job_id: str) -> None:
        self._update(job_id, None, enqueued_at=utcnow())

    def _update(self, job_id: str, where: Sequence | None, **values: Any) -> bool:
        values.setdefault("updated_at", utcnow())
        with self.session() as s:
            res = s.execute(update(JobRow).where(JobRow.id == job_id, *(where or ())).values(**values))
            return res.rowcount == 1

    def event(self, job_id: str, kind: str, detail: Any = None) -> None:
        with self.session() as s:
            s.add(EventRow(job_id=job_id, kind=kind, detail=None if detail is None else json.dumps(detail)))

    def events(self, job_id: str) -> list[EventRow]:
        with self.session() as s:
            return list(s.scalars(select(EventRow).where(EventRow.job_id == job_id).order_by(EventRow.id)))

    def claim(self, job_id: str, worker: str, heartbeat_timeout_s: float, max_running: int | None = None) -> Claim:
        """Start (or take over) a job: queued, or running with a stale heartbeat (its worker died).

        The attempt counter goes up by one; past `max_attempts` the job fails instead. With
        `max_running`, a job whose owner already runs that many jobs is left as it is (reason
        "owner at its running limit").
        """
        now = utcnow()
        stale = now - timedelta(seconds=heartbeat_timeout_s)
        takeover = and_(
            JobRow.status == JobStatus.running.value, or_(JobRow.heartbeat_at.is_(None), JobRow.heartbeat_at < stale)
        )
        with self.session() as s:
            if max_running is not None:
                owner = s.scalar(select(JobRow.owner).where(JobRow.id == job_id))
                if s.bind.dialect.name == "postgresql":  # serialise the claims of one owner
                    s.execute(text("SELECT pg_advisory_xact_lock(hashtext(:owner))"), {"owner": owner or ""})
                running = s.scalar(
                    select(func.count())
                    .select_from(JobRow)
                    .where(
                        JobRow.owner == owner,
                        JobRow.id != job_id,
                        JobRow.status.in_((JobStatus.running.value, JobStatus.cancelling.value)),
                        JobRow.heartbeat_at >= stale,
                    )
                )
                if running >= max_running:
                    return Claim(None, "owner at its running limit", None)
            res = s.execute(
                update(JobRow)
                .where(
                    JobRow.id == job_id,
                    or_(JobRow.status == JobStatus.queued.value, takeover),
                    JobRow.attempt < JobRow.max_attempts,
                )
                .values(
                    status=JobStatus.running.value,
                    attempt=JobRow.attempt + 1,
                    worker=worker,
                    heartbeat_at=now,
                    updated_at=now,
                    started_at=now,
                    error=None,
                )
            )
            claimed = res.rowcount == 1
        job = self.get_job(job_id)
        if job is None:
            return Claim(None, "no such job")
        if claimed:
            self.event(job_id, "started", {"attempt": job.attempt, "worker": worker})
            return Claim(job.attempt, "claimed", job)
        if job.status in TERMINAL:
            return Claim(None, f"job is already {job.status}", job)
        hb_stale = job.heartbeat_at is None or job.heartbeat_at < stale
        if job.status == JobStatus.running.value and hb_stale and job.attempt >= job.max_attempts:
            error = {
                "type": "urn:nnm:problem:worker-lost",
                "title": "Worker lost",
                "status": 500,
                "detail": f"the job's worker stopped {job.attempt} times (limit {job.max_attempts}); "
                "it may be using more memory or time than the worker has",
            }
            self.finish(job_id, job.attempt, JobStatus.failed.value, error=error)
            return Claim(None, "too many attempts", self.get_job(job_id))
        if job.status == JobStatus.cancelling.value and hb_stale:
            self.finish(job_id, job.attempt, JobStatus.cancelled.value)
            return Claim(None, "cancelled", self.get_job(job_id))
        return Claim(None, f"job is {job.status} on another worker", job)

    def heartbeat(self, job_id: str, attempt: int) -> str | None:
        """Refresh the heartbeat; returns the job's status (None when this attempt no longer owns it)."""
        now = utcnow()
        if not self._update(
            job_id, [JobRow.attempt == attempt, JobRow.status.in_(ACTIVE)], heartbeat_at=now, updated_at=now
        ):
            return None
        job = self.get_job(job_id)
        return job.status if job else None

    def update_progress(self, job_id: str, attempt: int, progress: dict[str, Any], stage: str | None) -> str | None:
        """Record progress (and heartbeat); returns the current status, e.g. `cancelling`."""
        now = utcnow()
        progress = {**progress, "updated_at": now.isoformat()}
        ok = self._update(
            job_id,
            [JobRow.attempt == attempt, JobRow.status.in_(ACTIVE)],
            progress=progress,
            stage=stage,
            heartbeat_at=now,
            updated_at=now,
        )
        if not ok:
            return None
        job = self.get_job(job_id)
        return job.status if job else None

    def set_stages(self, job_id: str, attempt: int, stages: list[dict[str, Any]]) -> None:
        self._update(job_id, [JobRow.attempt == attempt], stages=stages)

    def finish(
        self,
        job_id: str,
        attempt: int,
        status: str,
        *,
        metrics: dict | None = None,
        error: dict | None = None,
        model_id: str | None = None,
    ) -> bool:
        """Move this attempt's job to a terminal status (only from running or cancelling)."""
        values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "heartbeat_at": None}
        if metrics is not None:
            values["metrics"] = metrics
        if error is not None:
            values["error"] = error
        if model_id is not None:
            values["model_id"] = model_id
        ok = self._update(
            job_id,
            [JobRow.attempt == attempt, JobRow.status.in_((JobStatus.running.value, JobStatus.cancelling.value))],
            **values,
        )
        if ok:
            self.event(job_id, status, {"attempt": attempt, **({"error": error["detail"]} if error else {})})
        return ok

    def release(self, job_id: str, attempt: int, reason: str) -> bool:
        """Hand a running job back to the queue (graceful worker shutdown): it resumes elsewhere."""
        ok = self._update(
            job_id,
            [JobRow.attempt == attempt, JobRow.status == JobStatus.running.value],
            status=JobStatus.queued.value,
            heartbeat_at=None,
            worker=None,
        )
        if ok:
            self.event(job_id, "released", {"attempt": attempt, "reason": reason})
        return ok

    def request_cancel(self, job_id: str) -> str | None:
        """queued -> cancelled at once; running -> cancelling. Returns the new status."""
        now = utcnow()
        if self._update(
            job_id, [JobRow.status == JobStatus.queued.value], status=JobStatus.cancelled.value, finished_at=now
        ):
            self.event(job_id, "cancelled", {"while": "queued"})
            return JobStatus.cancelled.value
        if self._update(job_id, [JobRow.status == JobStatus.running.value], status=JobStatus.cancelling.value):
            self.event(job_id, "cancelling", None)
            return JobStatus.cancelling.value
        job = self.get_job(job_id)
        return job.status if job else None

    def stale_jobs(self, older_than_s: float) -> list[JobRow]:
        """Queued jobs enqueued long ago and running jobs with stale heartbeats (for the reconciler)."""
        cutoff = utcnow() - timedelta(seconds=older_than_s)
        with self.session() as s:
            return list(
                s.scalars(
                    select(JobRow).where(
                        or_(
                            and_(
                                JobRow.status == JobStatus.queued.value,
                                or_(JobRow.enqueued_at.is_(None), JobRow.enqueued_at < cutoff),
                            ),
                            and_(
                                JobRow.status.in_((JobStatus.running.value, JobStatus.cancelling.value)),
                                or_(JobRow.heartbeat_at.is_(None), JobRow.heartbeat_at < cutoff),
                            ),
                        )
                    )
                )
            )

    def count_active(self, owner: str | None = None) -> dict[str, int]:
        query = select(JobRow.status, func.count()).where(JobRow.status.in_(ACTIVE)).group_by(JobRow.status)
        if owner:
            query = query.where(JobRow.owner == owner)
        with self.session() as s:
            return {status: n for status, n in s.execute(query)}

    def count_active_by_queue(self) -> dict[tuple[str, str], int]:
        """Active jobs per (queue, status): what a queue holds (the workers' queue-depth gauge)."""
        query = (select(JobRow.queue, JobRow.status, func.count()).where(JobRow.status.in_(ACTIVE))
                 .group_by(JobRow.queue, JobRow.status))
        with self.session() as s:
            return {(queue, status): n for queue, status, n in s.execute(query)}

    # ------------------------------------------------------------------ artifacts and models

    def add_artifacts(self, job_id: str, items: Sequence[tuple[str, str, int]], *, attempt: int,
                      replace_prefix: str | None = None) -> bool:
        """Record (name, key, size) artifacts that `attempt` wrote; re-recording a name updates it.

        Only while `attempt` is the job's current attempt and the job is running or cancelling, checked
        in the same transaction that writes the rows (which holds the job's row, so a takeover waits
        for it): a worker that lost its job cannot repoint the artifacts of the attempt that took over.
        With `replace_prefix`, earlier rows under that prefix that `items` does not name are removed,
        so the recorded files of a stage all come from one attempt. False when `attempt` is not current.
        """
        with self.session() as s:
            if not self._hold_attempt(s, job_id, attempt):
                return False
            existing = {a.name: a for a in s.scalars(select(ArtifactRow).where(ArtifactRow.job_id == job_id))}
            names = {name for name, _, _ in items}
            for name, key, size in items:
                if name in existing:
                    existing[name].key, existing[name].size = key, size
                else:
                    s.add(ArtifactRow(job_id=job_id, name=name, key=key, size=size))
            if replace_prefix:
                for name, row in existing.items():
                    if name.startswith(replace_prefix) and name not in names:
                        s.delete(row)
        return True

    def artifacts(self, job_id: str) -> list[ArtifactRow]:
        with self.session() as s:
            return list(s.scalars(select(ArtifactRow).where(ArtifactRow.job_id == job_id).order_by(ArtifactRow.name)))

    def artifact(self, job_id: str, name: str) -> ArtifactRow | None:
        with self.session() as s:
            return s.scalar(select(ArtifactRow).where(ArtifactRow.job_id == job_id, ArtifactRow.name == name))

    @staticmethod
    def _upsert_model(s: Session, fields: dict[str, Any]) -> ModelRow:
        """Create the job's model row, or update it (a job has at most one model)."""
        existing = s.scalar(select(ModelRow).where(ModelRow.job_id == fields["job_id"]))
        if existing is not None:
            for k, v in fields.items():
                setattr(existing, k, v)
            return existing
        row = ModelRow(id=new_id("mdl"), **fields)
        s.add(row)
        return row

    def get_model(self, model_id: str, owner: str | None = None) -> ModelRow | None:
        with self.session() as s:
            row = s.get(ModelRow, model_id)
            return row if row is not None and (owner is None or row.owner == owner) else None

    def list_models(self, owner: str, cursor: str | None, limit: int) -> tuple[list[ModelRow], str | None]:
        return self._page(ModelRow, [ModelRow.owner == owner], cursor, limit)

    # ------------------------------------------------------------------ deletion and retention

    def _active_users(self, s: Session, owner: str, job_id: str | None = None, model_id: str | None = None,
                      dataset_id: str | None = None) -> list[str]:
        """Ids of the owner's queued or running jobs that need this job, model or dataset."""
        active = list(s.scalars(select(JobRow).where(JobRow.owner == owner, JobRow.status.in_(ACTIVE))))
        users = []
        for job in active:
            refs = set((job.inputs or {}).values())
            if (job_id and job_id in refs) or (model_id and model_id in refs) or (
                    dataset_id and job.dataset_id == dataset_id):
                users.append(job.id)
        return users

    def delete_dataset(self, dataset_id: str, owner: str) -> tuple[str, DatasetRow | None, list[str]]:
        """Mark an owner's dataset deleted: ("deleted", row, []), ("missing", None, []) or
        ("in-use", row, ids of the queued or running jobs that still need it). The caller removes its files."""
        with self.owner_lock("jobs", owner) as s:
            row = s.get(DatasetRow, dataset_id)
            if row is None or row.owner != owner or row.deleted_at is not None:
                return "missing", None, []
            users = self._active_users(s, owner, dataset_id=dataset_id)
            if users:
                return "in-use", row, users
            row.deleted_at = utcnow()
            return "deleted", row, []

    def delete_job(self, job_id: str, owner: str) -> tuple[str, JobRow | None, list[str]]:
        """Delete an owner's finished job with its artifact records, events and model:
        ("deleted", row, []), ("missing", None, []), ("active", row, []) while it is queued or running,
        or ("in-use", row, ids of active jobs that use it as an input). The caller removes its files."""
        with self.owner_lock("jobs", owner) as s:
            row = s.get(JobRow, job_id)
            if row is None or row.owner != owner:
                return "missing", None, []
            if row.status in ACTIVE:
                return "active", row, []
            models = list(s.scalars(select(ModelRow.id).where(ModelRow.job_id == job_id)))
            users = self._active_users(s, owner, job_id=job_id)
            for model_id in models:
                users += self._active_users(s, owner, model_id=model_id)
            if users:
                return "in-use", row, sorted(set(users))
            s.execute(delete(ArtifactRow).where(ArtifactRow.job_id == job_id))
            s.execute(delete(EventRow).where(EventRow.job_id == job_id))
            s.execute(delete(ModelRow).where(ModelRow.job_id == job_id))
            s.delete(row)
            return "deleted", row, []

    def delete_model(self, model_id: str, owner: str) -> tuple[str, ModelRow | None, list[str]]:
        """Delete an owner's model (its job stays, without the model): results as `delete_job`'s."""
        with self.owner_lock("jobs", owner) as s:
            row = s.get(ModelRow, model_id)
            if row is None or row.owner != owner:
                return "missing", None, []
            users = self._active_users(s, owner, model_id=model_id)
            if users:
                return "in-use", row, users
            s.execute(delete(ArtifactRow).where(ArtifactRow.job_id == row.job_id, ArtifactRow.name.like("model/%")))
            s.execute(update(JobRow).where(JobRow.id == row.job_id).values(model_id=None))
            s.delete(row)
            return "deleted", row, []

    def expire_artifacts(self, older_than: datetime, keep: Sequence[str] = ("metrics.json",),
                         limit: int = 100) -> list[str]:
        """Forget the artifacts of jobs that finished before `older_than`, except the model and `keep`;
        returns those jobs' ids (the caller deletes their files). Jobs an active job still uses are skipped."""
        out: list[str] = []
        with self.session() as s:
            candidates = list(s.scalars(
                select(JobRow).where(JobRow.status.in_(TERMINAL), JobRow.finished_at < older_than,
                                     JobRow.id.in_(select(ArtifactRow.job_id).where(
                                         ~ArtifactRow.name.like("model/%"), ArtifactRow.name.not_in(list(keep)))))
                .limit(limit)))
        for job in candidates:
            with self.owner_lock("jobs", job.owner) as s:
                models = list(s.scalars(select(ModelRow.id).where(ModelRow.job_id == job.id)))
                if self._active_users(s, job.owner, job_id=job.id) or any(
                        self._active_users(s, job.owner, model_id=m) for m in models):
                    continue
                rows = list(s.scalars(select(ArtifactRow).where(
                    ArtifactRow.job_id == job.id, ~ArtifactRow.name.like("model/%"),
                    ArtifactRow.name.not_in(list(keep)))))
                for a in rows:
                    s.delete(a)
                s.add(EventRow(job_id=job.id, kind="artifacts-expired", detail=json.dumps({"count": len(rows)})))
                out.append(job.id)
        return out

    # ------------------------------------------------------------------ fencing by attempt, republishing

    def _hold_attempt(self, s: Session, job_id: str, attempt: int) -> bool:
        """Within `s`: whether `attempt` still owns the job (running or cancelling), holding the job's
        row until `s` ends.

        A no-op UPDATE rather than SELECT ... FOR UPDATE: it takes the row lock on Postgres and the
        write lock on SQLite alike, so a claim by another worker waits until `s` commits.
        """
        res = s.execute(
            update(JobRow)
            .where(JobRow.id == job_id, JobRow.attempt == attempt,
                   JobRow.status.in_((JobStatus.running.value, JobStatus.cancelling.value)))
            .values(updated_at=utcnow())
        )
        return res.rowcount == 1

    def add_model_for_attempt(self, attempt: int, **fields: Any) -> ModelRow | None:
        """Create or update the job's model, only while `attempt` owns the job; else None."""
        with self.session() as s:
            if not self._hold_attempt(s, fields["job_id"], attempt):
                return None
            return self._upsert_model(s, fields)

    def take_republish(self, job: JobRow) -> datetime | None:
        """Take the turn to publish `job` again, as it was read: a compare-and-set of `enqueued_at` on
        the row's status, attempt, heartbeat and `enqueued_at`, so that of several reconcilers (one per
        gateway replica) that read the same row, one publishes. Returns the new `enqueued_at`, or None
        when another reconciler got there first or the job moved on (claimed, heartbeat, finished)."""

        def same(column: Any, value: datetime | None) -> Any:
            return column.is_(None) if value is None else column == value

        now = utcnow()
        ok = self._update(
            job.id,
            [JobRow.status == job.status, JobRow.attempt == job.attempt,
             same(JobRow.heartbeat_at, job.heartbeat_at), same(JobRow.enqueued_at, job.enqueued_at)],
            enqueued_at=now,
        )
        return now if ok else None

    def release_republish(self, job_id: str, taken: datetime, previous: datetime | None) -> None:
        """Undo `take_republish` after the publish failed, so that the next pass tries again."""
        self._update(job_id, [JobRow.enqueued_at == taken], enqueued_at=previous)
