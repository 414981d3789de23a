"""Job store transitions on both backends (SQLite and the local Postgres)."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from nnm.service.store.db import JobRow, utcnow
from nnm.service.store.migrations import upgrade
from nnm.service.store.repository import IdempotencyConflict, JobStore
from sqlalchemy import update

from .servers import postgres_database


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
        upgrade(url)
        s = JobStore(url)
        yield s
        s.dispose()
    else:
        with postgres_database() as url:
            upgrade(url)
            s = JobStore(url)
            yield s
            s.dispose()


def new_dataset(store: JobStore, owner: str):
    return store.add_dataset(
        owner=owner,
        name="d",
        kind="builtin",
        builtin="digits",
        split=None,
        key=None,
        image_count=10,
        image_size=8,
        channels=1,
        classes=None,
        size_bytes=None,
    )


def new_job(store: JobStore, **kw):
    ds = new_dataset(store, "alice")
    job, created = store.create_job(
        owner="alice",
        type="pipeline",
        dataset_id=ds.id,
        inputs={},
        params={},
        queue="gpu",
        max_attempts=kw.pop("max_attempts", 2),
        **kw,
    )
    assert created
    return job


def make_stale(store: JobStore, job_id: str) -> None:
    with store.session() as s:
        s.execute(update(JobRow).where(JobRow.id == job_id).values(heartbeat_at=utcnow() - timedelta(hours=1)))


def test_only_one_worker_claims_a_job(store):
    job = new_job(store)
    results = []
    barrier = threading.Barrier(4)

    def claim(i):
        barrier.wait()
        results.append(store.claim(job.id, f"w{i}", 60).attempt)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r for r in results if r is not None) == [1]
    assert store.get_job(job.id).status == "running"


def test_takeover_after_a_lost_worker_then_failure_past_the_limit(store):
    job = new_job(store, max_attempts=2)
    assert store.claim(job.id, "w1", 60).attempt == 1
    assert store.claim(job.id, "w2", 60).attempt is None  # heartbeat fresh: still owned by w1
    make_stale(store, job.id)
    assert store.claim(job.id, "w2", 60).attempt == 2
    assert not store.finish(job.id, 1, "succeeded")  # the lost attempt cannot write any more
    make_stale(store, job.id)
    claim = store.claim(job.id, "w3", 60)
    assert claim.attempt is None and claim.reason == "too many attempts"
    failed = store.get_job(job.id)
    assert failed.status == "failed" and "stopped 2 times" in failed.error["detail"]


def test_cancel_transitions(store):
    queued = new_job(store)
    assert store.request_cancel(queued.id) == "cancelled"
    running = new_job(store)
    store.claim(running.id, "w", 60)
    assert store.request_cancel(running.id) == "cancelling"
    assert store.update_progress(running.id, 1, {"epoch": 1}, "pretext") == "cancelling"
    assert store.finish(running.id, 1, "cancelled")
    assert store.request_cancel(running.id) == "cancelled"  # already ended: unchanged


def test_release_puts_a_job_back(store):
    job = new_job(store)
    store.claim(job.id, "w", 60)
    assert store.release(job.id, 1, "shutdown")
    assert store.get_job(job.id).status == "queued"
    assert store.claim(job.id, "w2", 60).attempt == 2


def test_idempotency(store):
    ds = new_dataset(store, "bob")
    args = dict(
        owner="bob",
        type="pretext",
        dataset_id=ds.id,
        inputs={},
        params={},
        queue="gpu",
        max_attempts=3,
        idempotency_key="k",
    )
    first, created = store.create_job(**args, request_hash="h1")
    store.mark_enqueued(first.id)
    again, created2 = store.create_job(**args, request_hash="h1")
    assert created and not created2 and again.id == first.id
    with pytest.raises(IdempotencyConflict):
        store.create_job(**args, request_hash="h2")
    other_owner, created3 = store.create_job(**{**args, "owner": "carol"}, request_hash="h2")
    assert created3 and other_owner.id != first.id


def test_keyset_pagination(store):
    ids = [new_job(store).id for _ in range(5)]
    seen, cursor = [], None
    while True:
        rows, cursor = store.list_jobs("alice", cursor, 2)
        seen += [r.id for r in rows]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == 5


def test_running_limit_per_owner(store):
    first, second = new_job(store), new_job(store)
    assert store.claim(first.id, "w1", 60, max_running=1).attempt == 1
    held = store.claim(second.id, "w2", 60, max_running=1)
    assert held.attempt is None and held.reason == "owner at its running limit"
    assert store.get_job(second.id).status == "queued"
    store.finish(first.id, 1, "succeeded")
    assert store.claim(second.id, "w2", 60, max_running=1).attempt == 1


def test_migrations_match_the_models(store):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from nnm.service.store.db import Base

    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_two_migrators_take_turns_on_postgres(tmp_path):
    """`nnm migrate` (the Kubernetes migrate Job) and gateways with auto-migration may start together:
    a migration waits for the advisory lock another migrator holds, then finds the schema current."""
    import os
    import subprocess
    import sys
    import time

    import psycopg
    from nnm.service.store.migrations import MIGRATION_LOCK

    def nnm_migrate(url: str) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NNM_")}
        env.update(NNM_DATABASE_URL=url, NNM_DATA_DIR=str(tmp_path))
        return subprocess.Popen([sys.executable, "-m", "nnm.cli.main", "migrate"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    with postgres_database() as url:
        dsn = url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(dsn, autocommit=True) as holder:
            holder.execute("SELECT pg_advisory_lock(hashtext(%s))", (MIGRATION_LOCK,))
            waiting = nnm_migrate(url)
            deadline = time.monotonic() + 120
            while not holder.execute(  # it asks for the lock and waits ...
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            ).fetchone()[0]:
                assert waiting.poll() is None, f"it did not wait for the lock: {waiting.communicate()}"
                assert time.monotonic() < deadline, "it never asked for the lock"
                time.sleep(0.1)
            assert holder.execute("SELECT to_regclass('public.jobs')").fetchone()[0] is None
            holder.execute("SELECT pg_advisory_unlock(hashtext(%s))", (MIGRATION_LOCK,))
            _, err = waiting.communicate(timeout=120)  # ... and migrates once it is free
            assert waiting.returncode == 0, err
            assert holder.execute("SELECT to_regclass('public.jobs')::text").fetchone()[0] == "jobs"
        # On an empty database, three at once (three pods): every one succeeds, one revision.
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DROP SCHEMA public CASCADE")
            conn.execute("CREATE SCHEMA public")
        runs = [nnm_migrate(url) for _ in range(3)]
        for run in runs:
            _, err = run.communicate(timeout=120)
            assert run.returncode == 0, err
        with psycopg.connect(dsn) as conn:
            assert len(conn.execute("SELECT version_num FROM alembic_version").fetchall()) == 1
            assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0


def test_the_gpu_autoscaler_query_counts_training_jobs_that_need_a_worker(store):
    """deploy/k8s/overlays/gpu/keda.yaml: KEDA keeps one GPU worker per value of this query, so it must
    count the training jobs queued, running or being cancelled, and nothing else."""
    from pathlib import Path

    import yaml
    from sqlalchemy import text

    keda = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "overlays" / "gpu" / "keda.yaml"
    scaled = next(d for d in yaml.safe_load_all(keda.read_text()) if d["kind"] == "ScaledObject")
    query = scaled["spec"]["triggers"][0]["metadata"]["query"]

    def count() -> int:
        with store.session() as s:
            return int(s.execute(text(query)).scalar_one())

    assert count() == 0
    wanted = {"queued": 1, "running": 1, "cancelling": 1, "succeeded": 0, "failed": 0, "cancelled": 0}
    for status in wanted:
        for queue in ("gpu", "cpu"):
            job = new_job(store)
            with store.session() as s:
                s.execute(update(JobRow).where(JobRow.id == job.id).values(status=status, queue=queue))
    assert count() == sum(wanted.values()) == 3
