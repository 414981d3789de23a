"""API keys, scopes and per-key limits.

Keys are random 32-byte tokens shown once; only their SHA-256 is stored, and the lookup result is
compared with `hmac.compare_digest`. When keys are required (NNM_AUTH=required, or auto with at least
one key defined), every /v1 route needs `Authorization: Bearer <key>` (or `X-API-Key`); a key owns
what it creates and sees nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

from sqlalchemy import func, select

from .db import ApiKeyRow, JobRow, new_id, utcnow
from .repository import JobStore

SCOPES = ("read", "write")
KEY_PREFIX = "nnm_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: the owner id of what they create, their scopes and limits."""

    owner: str
    scopes: frozenset[str]
    max_running_jobs: int | None = None
    max_queued_jobs: int | None = None
    uploads_per_minute: int | None = None


ANONYMOUS = Principal(owner="public", scopes=frozenset(SCOPES))


class KeyStore:
    """API keys in the job store."""

    def __init__(self, jobs: JobStore):
        self.jobs = jobs

    def create(self, name: str, scopes: list[str], max_running_jobs: int | None = None,
               max_queued_jobs: int | None = None, uploads_per_minute: int | None = None) -> tuple[str, ApiKeyRow]:
        """A new key; returns (the key, shown only now; its row)."""
        unknown = sorted(set(scopes) - set(SCOPES))
        if unknown:
            raise ValueError(f"unknown scope(s) {unknown}; choose from {list(SCOPES)}")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        row = ApiKeyRow(id=new_id("key"), name=name, key_hash=hash_key(key), scopes=sorted(set(scopes)),
                        max_running_jobs=max_running_jobs, max_queued_jobs=max_queued_jobs,
                        uploads_per_minute=uploads_per_minute)
        with self.jobs.session() as s:
            s.add(row)
        return key, row

    def find(self, key: str) -> ApiKeyRow | None:
        digest = hash_key(key)
        with self.jobs.session() as s:
            row = s.scalar(select(ApiKeyRow).where(ApiKeyRow.key_hash == digest, ApiKeyRow.revoked_at.is_(None)))
        if row is None or not hmac.compare_digest(row.key_hash, digest):
            return None
        return row

    def any_active(self) -> bool:
        with self.jobs.session() as s:
            return bool(s.scalar(select(func.count()).select_from(ApiKeyRow).where(ApiKeyRow.revoked_at.is_(None))))

    def list(self) -> list[ApiKeyRow]:
        with self.jobs.session() as s:
            return list(s.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at)))

    def revoke(self, key_id: str) -> bool:
        with self.jobs.session() as s:
            row = s.get(ApiKeyRow, key_id)
            if row is None or row.revoked_at is not None:
                return False
            row.revoked_at = utcnow()
            return True


def principal_of(row: ApiKeyRow) -> Principal:
    return Principal(owner=row.id, scopes=frozenset(row.scopes or ()), max_running_jobs=row.max_running_jobs,
                     max_queued_jobs=row.max_queued_jobs, uploads_per_minute=row.uploads_per_minute)


def active_jobs(jobs: JobStore, owner: str) -> dict[str, int]:
    with jobs.session() as s:
        rows = s.execute(select(JobRow.status, func.count()).where(
            JobRow.owner == owner, JobRow.status.in_(("queued", "running", "cancelling"))).group_by(JobRow.status))
        return {status: n for status, n in rows}


class RateLimiter:
    """Per-key token buckets (in this gateway process) for uploads."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str, per_minute: int) -> float:
        """Take one token; returns 0 when allowed, else the seconds until one is available."""
        rate = per_minute / 60.0
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(per_minute), now))
            tokens = min(float(per_minute), tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / rate
