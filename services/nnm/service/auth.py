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
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, func, select

from .store.db import ApiKeyRow, UploadEventRow, new_id, utcnow
from .store.repository import JobStore

#: `read` for GET, `write` for everything else, `metrics` for Prometheus' /metrics (global job counts),
#: `admin` for /v1/admin (creating and revoking keys).
SCOPES = ("read", "write", "metrics", "admin")
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


#: Callers without a key where none is required: everything but the admin API, which always needs a key.
ANONYMOUS = Principal(owner="public", scopes=frozenset(SCOPES) - {"admin"})
#: The bearer of NNM_ADMIN_KEY: manages keys (the first one included), owns and sees no data.
ADMIN = Principal(owner="admin", scopes=frozenset({"admin"}))


def is_admin_key(key: str, admin_key: str | None) -> bool:
    """Whether `key` is the configured NNM_ADMIN_KEY (compared as digests, in constant time)."""
    return bool(admin_key) and hmac.compare_digest(hash_key(key), hash_key(admin_key))


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

    def any_ever(self) -> bool:
        """Whether a key was ever created, revoked ones included (auto mode stays closed after that)."""
        with self.jobs.session() as s:
            return s.scalar(select(ApiKeyRow.id).limit(1)) is not None

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


class UploadLimiter:
    """Uploads per minute per owner, counted in the job store so that every gateway replica shares
    one budget (a sliding window of the last 60 s)."""

    WINDOW_S = 60.0

    def __init__(self, jobs: JobStore):
        self.jobs = jobs

    def take(self, owner: str, per_minute: int) -> float:
        """Record one upload; returns 0 when allowed, else the seconds until one is allowed again."""
        now = utcnow()
        since = now - timedelta(seconds=self.WINDOW_S)
        with self.jobs.owner_lock("upload", owner) as s:
            s.execute(delete(UploadEventRow).where(UploadEventRow.owner == owner, UploadEventRow.at < since))
            times = list(s.scalars(select(UploadEventRow.at).where(UploadEventRow.owner == owner,
                                                                    UploadEventRow.at >= since)
                                   .order_by(UploadEventRow.at)))
            if len(times) >= per_minute:
                oldest = times[len(times) - per_minute]
                return max(0.1, (oldest - since).total_seconds())
            s.add(UploadEventRow(owner=owner, at=now))
            return 0.0
