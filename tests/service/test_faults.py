"""Faults against the real parts: kill -9 of a worker, a poison job, graceful shutdown, a Redis
restart, a Postgres outage and S3 outages. Each test's figures go to docs/reliability.md."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import redis
from nnm.service.client import Client

from .conftest import child_processes_of, digits_zip, figure
from .servers import own_postgres, own_redis, seaweedfs, start_gateway, start_worker, stop, wait_bucket

pytestmark = pytest.mark.slow

#: About a minute on 2 cores; one checkpoint per epoch, so there is something to resume from.
LONG_PIPELINE = {"preset": "quick", "runtime": {"seed": 5}, "pretext": {"epochs": 14, "batch_size": 64},
                 "cluster": {"epochs": 2}, "selflabel": {"epochs": 1}}
class Stack:
    """Postgres, Redis and S3 of its own, the gateway, and workers started and killed at will."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env = root, env
        self.workers: list[subprocess.Popen] = []
        self.gateway, base = start_gateway(env, root / "gateway.log")
        self.client = Client(base, timeout=60)

    def start_worker(self, name: str) -> subprocess.Popen:
        proc = start_worker(self.env, self.root / f"worker-{name}.log", name=name)
        self.workers.append(proc)
        return proc

    def kill_worker(self, proc: subprocess.Popen, job_id: str | None = None) -> None:
        """kill -9 the worker's process group and the job's training child."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for pid in child_processes_of(job_id) if job_id else []:
            os.kill(pid, signal.SIGKILL)
        # SIGKILL is delivered asynchronously: on a loaded machine the child can still be listed for a
        # moment. Wait for it to go (the callers then assert that nothing of the job is left).
        deadline = time.monotonic() + 10
        while job_id and child_processes_of(job_id) and time.monotonic() < deadline:
            time.sleep(0.05)

    def wait_for(self, job_id: str, predicate, timeout: float = 300, poll_s: float = 0.2) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                job = self.client.job(job_id)
                if predicate(job):
                    return job
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id}: condition not met; last {job['status']} attempt {job['attempt']}")
            time.sleep(poll_s)

    def close(self) -> None:
        self.client.close()
        for proc in self.workers:
            stop(proc, timeout=60)
        stop(self.gateway)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    with own_postgres() as (pg_url, pg), own_redis(root / "redis") as (redis_url, redis), \
            seaweedfs(root / "s3") as s3:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NNM_")}
        env.update({
            "NNM_DATABASE_URL": pg_url, "NNM_BROKER_URL": redis_url, "NNM_S3_ENDPOINT": s3["endpoint"],
            "NNM_S3_ACCESS_KEY": s3["access_key"], "NNM_S3_SECRET_KEY": s3["secret_key"],
            "NNM_DATA_DIR": str(root / "data"), "NNM_DEVICE": "cpu", "NNM_JOB_MAX_ATTEMPTS": "2",
            "NNM_HEARTBEAT_TIMEOUT_S": "8", "NNM_RECONCILE_INTERVAL_S": "2", "NNM_CHECKPOINT_UPLOAD_INTERVAL_S": "0",
            "NNM_CANCEL_GRACE_S": "5",
        })
        r = subprocess.run([sys.executable, "-m", "nnm.cli.main", "migrate"], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        st = Stack(root, env)
        st.pg, st.redis, st.s3 = pg, redis, s3
        zipped = root / "digits.zip"
        zipped.write_bytes(digits_zip())
        st.dataset = st.client.upload_dataset(zipped)
        # Faults aimed at a moment inside an epoch need epochs longer than the 1-s progress heartbeat and
        # a job that outlasts the hand-back: all 1,797 digits (28 steps per epoch instead of 4).
        whole = root / "digits-all.zip"
        whole.write_bytes(digits_zip(1797))
        st.long_dataset = st.client.upload_dataset(whole)
        try:
            yield st
        finally:
            st.close()


def resumed_after(stack: Stack, job_id: str) -> list[int]:
    """Epochs after which an attempt resumed, from the job's recorded messages."""
    events = stack.client.http.get(f"/v1/jobs/{job_id}").json()  # the job must still be readable
    assert events["id"] == job_id
    from nnm.service.store.repository import JobStore

    store = JobStore(stack.env["NNM_DATABASE_URL"])
    try:
        found = []
        for e in store.events(job_id):
            if e.kind == "message" and e.detail and "resuming after epoch" in e.detail:
                found.append(int(json.loads(e.detail)["text"].rsplit(" ", 1)[-1]))
        return found
    finally:
        store.dispose()


def job_in_training(stack: Stack, worker_name: str) -> tuple[subprocess.Popen, dict]:
    """A new worker, and a pipeline job on it that has finished two pretext epochs."""
    worker = stack.start_worker(worker_name)
    job = stack.client.submit("pipeline", stack.dataset["id"], LONG_PIPELINE)
    stack.wait_for(job["id"], lambda j: (j.get("progress") or {}).get("epoch", 0) >= 2)
    return worker, job


def test_kill_9_mid_epoch_resumes_on_a_new_worker(stack: Stack):
    w1 = stack.start_worker("k1")
    job = stack.client.submit("pipeline", stack.long_dataset["id"], LONG_PIPELINE)
    stack.wait_for(job["id"], lambda j: (j.get("progress") or {}).get("stage") == "pretext"
                   and (j["progress"].get("epoch") or 0) >= 6 and (j["progress"].get("step") or 0) >= 2)
    killed = time.monotonic()
    stack.kill_worker(w1, job["id"])
    assert child_processes_of(job["id"]) == []
    w2 = stack.start_worker("k2")
    stack.wait_for(job["id"], lambda j: j["attempt"] == 2 and j["status"] == "running", timeout=120)
    redelivery_s = time.monotonic() - killed
    final = stack.client.wait(job["id"], timeout=600)
    assert final["status"] == "succeeded", final["error"]
    assert final["attempt"] == 2
    resumed = resumed_after(stack, job["id"])
    assert resumed and resumed[0] >= 4, resumed  # from its last checkpoint, not from epoch 0
    reference = stack.client.wait(stack.client.submit("pipeline", stack.long_dataset["id"], LONG_PIPELINE)["id"],
                                  timeout=600)
    assert reference["status"] == "succeeded" and reference["attempt"] == 1
    diff = {k: abs(final["metrics"][k] - reference["metrics"][k]) for k in ("acc", "nmi", "ari")}
    assert max(diff.values()) <= 0.02, diff
    figure("kill -9 worker mid-epoch", redelivery_s=round(redelivery_s, 1), resumed_after_epoch=resumed[0],
           metric_differences=diff, attempt=final["attempt"])
    stack.workers.remove(w2)
    stop(w2, timeout=60)


def test_poison_job_fails_after_its_attempts(stack: Stack):
    job = stack.client.submit("pipeline", stack.long_dataset["id"], LONG_PIPELINE)
    started = time.monotonic()
    for attempt in (1, 2):
        worker = stack.start_worker(f"p{attempt}")
        stack.wait_for(job["id"], lambda j, a=attempt: j["status"] == "running" and j["attempt"] == a, timeout=120)
        time.sleep(1.0)
        stack.kill_worker(worker, job["id"])
        stack.workers.remove(worker)
    watcher = stack.start_worker("p3")
    final = stack.wait_for(job["id"], lambda j: j["status"] in {"failed", "succeeded", "cancelled"}, timeout=120)
    assert final["status"] == "failed" and final["attempt"] == 2
    assert final["error"]["type"] == "urn:nnm:problem:worker-lost"
    assert "2 times" in final["error"]["detail"]
    figure("poison job", attempts=final["attempt"], seconds_to_failed=round(time.monotonic() - started, 1),
           error=final["error"]["detail"])
    stack.workers.remove(watcher)
    stop(watcher, timeout=60)


def test_sigterm_hands_the_running_job_back(stack: Stack):
    w1 = stack.start_worker("g1")
    job = stack.client.submit("pipeline", stack.long_dataset["id"], LONG_PIPELINE)
    stack.wait_for(job["id"], lambda j: (j.get("progress") or {}).get("epoch", 0) >= 3)
    t0 = time.monotonic()
    os.kill(w1.pid, signal.SIGTERM)  # warm shutdown of the Celery worker
    queued = stack.wait_for(job["id"], lambda j: j["status"] == "queued", timeout=60, poll_s=0.1)
    handback_s = time.monotonic() - t0
    assert queued["attempt"] == 1
    w1.wait(timeout=60)
    assert child_processes_of(job["id"]) == []
    stack.workers.remove(w1)
    w2 = stack.start_worker("g2")
    final = stack.client.wait(job["id"], timeout=600)
    assert final["status"] == "succeeded" and final["attempt"] == 2
    assert resumed_after(stack, job["id"])
    figure("SIGTERM to a worker with a running job", handback_s=round(handback_s, 1), final_attempt=2)
    stack.workers.remove(w2)
    stop(w2, timeout=60)


def test_redis_restart_loses_no_job(stack: Stack):
    w = stack.start_worker("r1")
    ids = [stack.client.submit("pipeline", stack.dataset["id"], LONG_PIPELINE)["id"] for _ in range(3)]
    stack.wait_for(ids[0], lambda j: j["status"] == "running" and (j.get("progress") or {}).get("epoch", 0) >= 2)
    most_children: Counter = Counter()
    sampling = True

    def sample() -> None:
        while sampling:
            for job_id in ids:
                most_children[job_id] = max(most_children[job_id], len(child_processes_of(job_id)))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stack.redis.stop()  # no persistence: the queued messages are gone
    time.sleep(2)
    stack.redis.start()
    restarted = time.monotonic()
    finals = [stack.client.wait(i, timeout=900) for i in ids]
    sampling = False
    sampler.join()
    assert [f["status"] for f in finals] == ["succeeded"] * 3, [f["error"] for f in finals]
    assert max(most_children.values()) <= 1  # never two training processes for one job
    figure("Redis restart (messages lost)", jobs=3, succeeded=3, attempts=[f["attempt"] for f in finals],
           seconds_until_all_done=round(time.monotonic() - restarted, 1))
    stack.workers.remove(w)
    stop(w, timeout=60)


def test_short_redis_blip_costs_no_attempt(stack: Stack):
    """Redis restarted for a few seconds with its data saved (a Redis with persistence): the running
    task is not cancelled, so the job keeps its attempt, and no second message is left for it."""
    w = stack.start_worker("b1")
    job = stack.client.submit("pipeline", stack.dataset["id"], LONG_PIPELINE)
    stack.wait_for(job["id"], lambda j: j["status"] == "running" and (j.get("progress") or {}).get("epoch", 0) >= 2)
    broker = redis.Redis.from_url(stack.env["NNM_BROKER_URL"])
    t0 = time.monotonic()
    with contextlib.suppress(redis.ConnectionError):
        broker.shutdown(save=True)  # writes dump.rdb, which the restarted server loads
    stack.redis.stop()
    time.sleep(3)
    stack.redis.start()
    down_s = time.monotonic() - t0
    while True:  # loaded (PING answers LOADING before): the file may go, so later restarts lose data again
        with contextlib.suppress(redis.ConnectionError, redis.BusyLoadingError):
            if broker.ping():
                break
        time.sleep(0.1)
    (stack.root / "redis" / "dump.rdb").unlink(missing_ok=True)
    final = stack.client.wait(job["id"], timeout=600)
    assert final["status"] == "succeeded", final["error"]
    assert final["attempt"] == 1
    from nnm.service.store.repository import JobStore

    store = JobStore(stack.env["NNM_DATABASE_URL"])
    try:
        started = [e for e in store.events(job["id"]) if e.kind == "started"]
    finally:
        store.dispose()
    assert len(started) == 1
    time.sleep(3)  # a message handed out again after the blip is consumed as a no-op within a second
    messages = sum(job["id"] in raw.decode() for q in ("gpu", "cpu") for raw in broker.lrange(q, 0, -1)) + sum(
        job["id"] in raw.decode() for raw in broker.hvals("unacked"))
    broker.close()
    assert messages <= 1
    figure("Redis restarted with its data (a few seconds) during a running job", redis_down_s=round(down_s, 1),
           job_status=final["status"], attempt=final["attempt"], started_events=len(started),
           messages_left=messages)
    stack.workers.remove(w)
    stop(w, timeout=60)


def _or_error(call):
    """The call's result, or the exception it raised (for a call made on a thread)."""
    try:
        return call()
    except Exception as exc:  # handed to the test thread, which asserts on it
        return exc


def test_postgres_outage(stack: Stack):
    w, job = job_in_training(stack, "pg1")
    stack.pg.stop()
    t0 = time.monotonic()
    answers = Counter()
    try:
        while time.monotonic() - t0 < 30:
            for r in (stack.client.http.get("/readyz"), stack.client.http.get(f"/v1/jobs/{job['id']}"),
                      stack.client.http.get("/v1/jobs")):
                answers[r.status_code] += 1
                if r.status_code != 200:
                    assert r.status_code == 503 and r.headers["content-type"].startswith("application/problem+json")
            time.sleep(1)
        # A client already waiting on the job keeps waiting through the outage (each 503 retried after
        # its Retry-After) and through the restart, when Postgres listens before it accepts queries.
        waited: dict[str, object] = {}
        waiter = threading.Thread(target=lambda: waited.update(
            job=_or_error(lambda: stack.client.wait(job["id"], timeout=600))), daemon=True)
        waiter.start()
        time.sleep(6)
        assert waiter.is_alive(), waited
    finally:  # a failure here must not leave the database down for the tests after it
        stack.pg.start()
    assert set(answers) == {503}, answers
    waiter.join(timeout=660)
    final = waited["job"]
    assert isinstance(final, dict), final
    assert final["status"] == "succeeded", final["error"]
    assert stack.client.http.get("/readyz").status_code == 200
    figure("Postgres stopped for 30 s", api_answers=dict(answers), job_status=final["status"],
           job_attempt=final["attempt"])
    stack.workers.remove(w)
    stop(w, timeout=60)


def test_short_s3_outage_is_retried(stack: Stack):
    w, job = job_in_training(stack, "s1")
    stack.s3["server"].stop()
    time.sleep(5)
    stack.s3["server"].start()
    final = stack.client.wait(job["id"], timeout=600)
    assert final["status"] == "succeeded", final["error"]
    assert stack.client.artifact(job["id"], "metrics.json")
    figure("S3 stopped for 5 s during a job", job_status=final["status"], attempt=final["attempt"])
    stack.workers.remove(w)
    stop(w, timeout=60)


def test_long_s3_outage_fails_clearly_and_never_succeeds(stack: Stack):
    w, job = job_in_training(stack, "s2")
    stack.s3["server"].stop()
    try:
        final = stack.client.wait(job["id"], timeout=600)
        assert final["status"] == "failed"
        assert final["error"]["type"] == "urn:nnm:problem:storage-unavailable"
        figure("S3 down for the rest of a job", job_status=final["status"], attempts=final["attempt"],
               error=final["error"]["detail"])
    finally:
        stack.s3["server"].start()
        wait_bucket(stack.s3["client"], stack.s3["bucket"])
        stack.workers.remove(w)
        stop(w, timeout=60)
