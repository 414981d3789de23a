"""The reconciler: its handling of a database that vanishes between its ping and its pass, and the
number of broker messages its passes leave per job, with two gateway replicas (real Postgres, Redis).

The database window is milliseconds wide, so that outage is injected here; the real Postgres outage
is in test_faults.py::test_postgres_outage.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import Counter
from datetime import timedelta
from types import SimpleNamespace

import pytest
import redis
from nnm.service.context import ServiceContext
from nnm.service.queue import QUEUES, CeleryQueue
from nnm.service.settings import load_settings
from nnm.service.store.db import JobRow, utcnow
from nnm.service.worker import reconciler as reconciler_module
from nnm.service.worker.reconciler import Reconciler, reconcile_once
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from .conftest import figure
from .servers import postgres_database, redis_database

JOB_ID = re.compile(r"job_[0-9a-f]{32}")


class VanishingJobStore:
    """Answers the ping, then fails the pass as a dropped Postgres connection does."""

    def __init__(self) -> None:
        self.passes = 0
        self.two_passes = threading.Event()

    def ping(self) -> None:
        return None

    def stale_jobs(self, timeout_s: float) -> list:
        self.passes += 1
        if self.passes >= 2:
            self.two_passes.set()
        raise OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))


def test_database_lost_mid_pass_is_a_warning_and_the_thread_goes_on(caplog):
    jobs = VanishingJobStore()
    ctx = SimpleNamespace(jobs=jobs, settings=SimpleNamespace(heartbeat_timeout_s=0.0))
    reconciler = Reconciler(ctx, queue=None, interval_s=0.01)
    with caplog.at_level(logging.WARNING, logger="nnm.reconciler"):
        reconciler.start()
        try:
            assert jobs.two_passes.wait(5), "the reconciler stopped after the first failed pass"
        finally:
            reconciler.stop()
            reconciler.join(5)
    records = [r for r in caplog.records if r.name == "nnm.reconciler"]
    assert records and all(r.levelno == logging.WARNING for r in records)
    assert all(r.exc_info is None for r in records)
    assert "database unreachable" in records[0].getMessage()
    assert "ConnectionRefusedError" in records[0].getMessage()


# ---------------------------------------------------------------------------------------------------
# Every replica's reconciler, every pass: at most one broker message per job.

STALE = timedelta(hours=1)


def broker_messages(redis_url: str) -> tuple[Counter, Counter]:
    """Messages per job id: (waiting in the `gpu`/`cpu` lists, delivered and unacknowledged)."""
    client = redis.Redis.from_url(redis_url)
    try:
        waiting, unacked = Counter(), Counter()
        for queue in QUEUES:
            for raw in client.lrange(queue, 0, -1):
                waiting.update(set(JOB_ID.findall(raw.decode())))
        for raw in client.hvals("unacked"):
            unacked.update(set(JOB_ID.findall(raw.decode())))
        return waiting, unacked
    finally:
        client.close()


def deliver(redis_url: str, queue: CeleryQueue, job_id: str, delivered_s_ago: float) -> None:
    """Publish a message for `job_id` and move it to the unacknowledged set as a worker's BRPOP and
    kombu's QoS do, delivered `delivered_s_ago` seconds ago."""
    queue.enqueue(job_id, "gpu")
    client = redis.Redis.from_url(redis_url)
    try:
        raw = client.lpop("gpu")  # the newest: kombu publishes with LPUSH
        message = json.loads(raw)
        tag = message["properties"]["delivery_tag"]
        client.hset("unacked", tag, json.dumps([message, "", "gpu"]))
        client.zadd("unacked_index", {tag: time.time() - delivered_s_ago})
    finally:
        client.close()


@pytest.fixture()
def broker_and_store(tmp_path):
    """A fresh Postgres database and Redis database; yields a factory of gateway-replica contexts."""
    with postgres_database() as pg, redis_database() as broker:
        made: list[ServiceContext] = []

        def replica(heartbeat_timeout_s: float) -> tuple[ServiceContext, CeleryQueue]:
            settings = load_settings({}, data_dir=tmp_path / "data", database_url=pg, broker_url=broker,
                                     heartbeat_timeout_s=heartbeat_timeout_s)
            ctx = ServiceContext.from_settings(settings, migrate=not made)
            made.append(ctx)
            return ctx, CeleryQueue(broker)

        try:
            yield replica, broker
        finally:
            for ctx in made:
                ctx.close()


def job_in_state(ctx: ServiceContext, status: str, **values) -> str:
    dataset = ctx.jobs.add_dataset(owner="public", name="digits", kind="builtin", builtin="digits", split=None,
                                   key=None, image_count=1797, image_size=8, channels=1, classes=None,
                                   size_bytes=None)
    job, _ = ctx.jobs.create_job(owner="public", type="pretext", dataset_id=dataset.id, inputs={}, params={},
                                 queue="gpu", max_attempts=3)
    with ctx.jobs.session() as s:
        s.execute(update(JobRow).where(JobRow.id == job.id).values(status=status, **values))
    return job.id


def test_passes_of_two_replicas_leave_at_most_one_message_per_job(broker_and_store, monkeypatch):
    replica, broker = broker_and_store
    (ctx_a, queue_a), (ctx_b, queue_b) = replica(1.0), replica(1.0)
    old = utcnow() - STALE
    running = {"attempt": 1, "heartbeat_at": old, "enqueued_at": old, "started_at": old}
    jobs = {
        "never published": job_in_state(ctx_a, "queued", created_at=old),
        "message lost": job_in_state(ctx_a, "queued", enqueued_at=old, created_at=old),
        "message waiting": job_in_state(ctx_a, "queued", enqueued_at=old, created_at=old),
        "worker died": job_in_state(ctx_a, "running", **running),
        "worker died while cancelling": job_in_state(ctx_a, "cancelling", **running),
        "worker died holding its message": job_in_state(ctx_a, "running", **running),
    }
    queue_a.enqueue(jobs["message waiting"], "gpu")
    deliver(broker, queue_a, jobs["worker died holding its message"], delivered_s_ago=STALE.total_seconds())

    passes: Counter = Counter()
    real_pass = reconciler_module.reconcile_once

    def counted(ctx, queue, *args, **kwargs):
        passes[id(ctx)] += 1
        return real_pass(ctx, queue, *args, **kwargs)

    monkeypatch.setattr(reconciler_module, "reconcile_once", counted)
    replicas = [Reconciler(ctx_a, queue_a, interval_s=0.05), Reconciler(ctx_b, queue_b, interval_s=0.05)]
    for r in replicas:
        r.start()
    try:  # past the first heartbeat timeout the reconcilers wait, then several more timeouts of passes
        time.sleep(5.0)
    finally:
        for r in replicas:
            r.stop()
            r.join(5)
    for ctx in (ctx_a, ctx_b):  # and passes in lockstep, the two replicas reading the same rows
        for _ in range(10):
            counted(ctx, queue_a if ctx is ctx_a else queue_b)
    assert min(passes[id(ctx_a)], passes[id(ctx_b)]) >= 20, passes

    waiting, unacked = broker_messages(broker)
    assert {name: waiting[job_id] for name, job_id in jobs.items()} == dict.fromkeys(jobs, 1)
    # The dead worker's message stays unacknowledged (kombu restores it only after the visibility
    # timeout, days); no other message is delivered-but-unacknowledged.
    assert unacked == Counter({jobs["worker died holding its message"]: 1})
    republished = Counter(e.job_id for job_id in jobs.values() for e in ctx_a.jobs.events(job_id)
                          if e.kind == "republished")
    assert max(republished.values()) == 1 and jobs["message waiting"] not in republished
    figure("reconciler: 2 replicas", passes=[passes[id(ctx_a)], passes[id(ctx_b)]], jobs=len(jobs),
           messages_waiting_per_job=sorted({waiting[j] for j in jobs.values()}), republished=sum(republished.values()))


def test_a_message_a_worker_just_received_is_not_duplicated(broker_and_store):
    """Delivered messages: live when received after the job's last heartbeat and recently (a worker
    about to claim, or deferring for DEFER_S); dead when its own worker received it before it died."""
    replica, broker = broker_and_store
    ctx, queue = replica(1.0)
    now = utcnow()

    def running(heartbeat_s_ago: float) -> dict:
        at = now - timedelta(seconds=heartbeat_s_ago)
        return {"attempt": 1, "heartbeat_at": at, "enqueued_at": at - timedelta(seconds=1), "started_at": at}

    just_received = job_in_state(ctx, "running", **running(STALE.total_seconds()))
    long_held = job_in_state(ctx, "running", **running(STALE.total_seconds()))
    died_after_claim = job_in_state(ctx, "running", **running(5))  # killed soon after it started
    deliver(broker, queue, just_received, delivered_s_ago=1)
    deliver(broker, queue, long_held, delivered_s_ago=2 * STALE.total_seconds())
    deliver(broker, queue, died_after_claim, delivered_s_ago=6)
    for _ in range(5):
        reconcile_once(ctx, queue)
    waiting, unacked = broker_messages(broker)
    assert waiting == Counter({long_held: 1, died_after_claim: 1})
    assert unacked == Counter({just_received: 1, long_held: 1, died_after_claim: 1})
