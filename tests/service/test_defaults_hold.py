"""Issue 9 at the DEFAULT settings: authentication before the body, capped JSON bodies, limits that
hold across requests and gateway replicas, no path into another owner's objects, a closed auto mode,
the preset fixed at submission, and a /healthz that answers while Postgres stalls.

Real parts: two gateway processes on one fresh Postgres database and one Redis database, the session's
SeaweedFS S3 server; no worker consumes this module's queue, so its jobs stay queued.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
import pytest

from .conftest import digits_zip, figure
from .servers import own_postgres, postgres_database, redis_database, start_gateway, stop

pytestmark = pytest.mark.slow


def _keys(env: dict[str, str], *args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "nnm.cli.main", "keys", *args], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}


@pytest.fixture(scope="module")
def stack(infra, tmp_path_factory):
    """Two gateway replicas at default limits (no NNM_MAX_* set, NNM_AUTH left at its default)."""
    root = tmp_path_factory.mktemp("defaults")
    s3 = infra["s3"]
    with postgres_database() as pg, redis_database() as broker:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NNM_")}
        env.update({"NNM_DATABASE_URL": pg, "NNM_BROKER_URL": broker, "NNM_S3_ENDPOINT": s3["endpoint"],
                    "NNM_S3_ACCESS_KEY": s3["access_key"], "NNM_S3_SECRET_KEY": s3["secret_key"],
                    "NNM_S3_BUCKET": s3["bucket"], "NNM_DATA_DIR": str(root / "data"), "NNM_DEVICE": "cpu",
                    "NNM_RECONCILE_INTERVAL_S": "0"})
        r = subprocess.run([sys.executable, "-m", "nnm.cli.main", "migrate"], env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        keys = {
            "alice": _keys(env, "create", "--name", "alice", "--max-queued", "2")["key"],
            "bob": _keys(env, "create", "--name", "bob", "--uploads-per-minute", "3")["key"],
            "carol": _keys(env, "create", "--name", "carol")["key"],
            "reader": _keys(env, "create", "--name", "reader", "--scopes", "read")["key"],
            "prometheus": _keys(env, "create", "--name", "prometheus", "--scopes", "metrics")["key"],
        }
        gw1, base1 = start_gateway(env, root / "gateway1.log")
        gw2, base2 = start_gateway(env, root / "gateway2.log")
        try:
            yield {"bases": [base1, base2], "keys": keys, "env": env}
        finally:
            stop(gw1)
            stop(gw2)


def http(base: str, key: str | None = None) -> httpx.Client:
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=60)


def _problem(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text[:500]
    assert r.headers["content-type"].startswith("application/problem+json")
    return r.json()


def test_anonymous_request_is_refused_before_its_body_is_read(stack):
    """Headers announcing a 300 MB JSON body, and no body at all: the 401 must come anyway, at once."""
    url = urlparse(stack["bases"][0])
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 300000000\r\n\r\n")
        started = time.monotonic()
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(65536)  # socket.timeout here means the gateway waits for the body
            if not chunk:
                break
            reply += chunk
        waited = time.monotonic() - started
    status_line = reply.split(b"\r\n", 1)[0]
    assert b" 401 " in status_line, reply[:300]
    assert b"application/problem+json" in reply.lower()
    figure("anonymous_300mb_headers_only", seconds_to_401=round(waited, 3))


def test_json_bodies_are_capped_at_a_mebibyte(stack):
    alice = http(stack["bases"][0], stack["keys"]["alice"])
    body = {"type": "pretext", "dataset_id": "ds_" + "0" * 32, "params": {"note": "x" * (2 * 1024 * 1024)}}
    problem = _problem(alice.post("/v1/jobs", json=body), 413)
    assert "1048576" in problem["detail"]
    # A large JSON body on the upload route is no upload either.
    _problem(alice.post("/v1/datasets", content=json.dumps({"builtin": "digits", "name": "y" * 2_000_000}),
                        headers={"content-type": "application/json"}), 413)


def test_queued_job_limit_holds_with_fresh_idempotency_keys_and_concurrency(stack):
    alice = http(stack["bases"][0], stack["keys"]["alice"])
    dataset = alice.post("/v1/datasets", json={"builtin": "digits"}).json()
    body = {"type": "pretext", "dataset_id": dataset["id"], "params": {"preset": "quick"}}
    statuses = [alice.post("/v1/jobs", json=body, headers={"Idempotency-Key": f"k{i}"}).status_code
                for i in range(5)]
    assert statuses.count(202) == 2 and statuses.count(429) == 3, statuses
    # A replay of an accepted request is not a new job and is not refused.
    replay = alice.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k0"})
    assert replay.status_code == 202 and replay.headers.get("idempotent-replayed") == "true"
    for job in alice.get("/v1/jobs", params={"status": "queued"}).json()["items"]:
        assert alice.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    # 20 at once, spread over both replicas.
    clients = [http(base, stack["keys"]["alice"]) for base in stack["bases"]]
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda i: clients[i % 2].post("/v1/jobs", json=body).status_code, range(20)))
    accepted = results.count(202)
    assert 1 <= accepted <= 2 and results.count(429) == 20 - accepted, results
    queued = alice.get("/v1/jobs", params={"status": "queued"}).json()["items"]
    assert len(queued) == accepted
    figure("queued_limit_default_settings", limit=2, sequential_accepted=2, concurrent_accepted=accepted)


def test_upload_rate_limit_is_shared_by_gateway_replicas(stack):
    clients = [http(base, stack["keys"]["bob"]) for base in stack["bases"]]
    results = [clients[i % 2].post("/v1/datasets", json={"builtin": "digits"}) for i in range(8)]
    statuses = [r.status_code for r in results]
    assert statuses.count(201) == 3, statuses
    refused = [r for r in results if r.status_code == 429]
    assert len(refused) == 5 and all(int(r.headers["retry-after"]) >= 1 for r in refused)
    _problem(refused[0], 429)


def test_no_path_into_another_owners_objects(stack):
    alice, carol = (http(stack["bases"][0], stack["keys"][k]) for k in ("alice", "carol"))
    dataset = alice.post("/v1/datasets", json={"builtin": "digits"}).json()
    foreign = carol.post("/v1/datasets", json={"builtin": "digits"})
    assert foreign.status_code == 201
    hostile = [
        ({"preset": "quick", "pretext": {"init": "backbone:../../jobs/job_0123/pretext/model"}}, {}, "pretext"),
        ({"preset": "quick", "pretext": {"init": "backbone:bb_" + "0" * 32}}, {}, "pretext"),  # not uploaded
        ({"preset": "quick", "pretext": {"init": "/etc/passwd"}}, {}, "pipeline"),
        ({"preset": "quick", "data": {"root": "/"}}, {}, "pretext"),
        ({"preset": "quick", "data": {"dataset": "/etc"}}, {}, "pretext"),
        ({"preset": "quick", "data": {"cache_dir": "/etc"}}, {}, "pretext"),
        ({"preset": "quick", "data": {"cache_max_bytes": 0}}, {}, "pipeline"),
        ({"preset": "quick"}, {"pretext_job_id": "../../jobs/x"}, "mine"),
        ({"preset": "quick", "pretext": {"init": "backbone:bb_" + "0" * 32}}, {"pretext_job_id": "job_" + "1" * 32},
         "mine"),
    ]
    for params, inputs, job_type in hostile:
        r = alice.post("/v1/jobs", json={"type": job_type, "dataset_id": dataset["id"], "params": params,
                                         "inputs": inputs})
        problem = _problem(r, 422)
        assert problem["detail"], problem
    # Another owner's dataset is not found.
    _problem(alice.post("/v1/jobs", json={"type": "pretext", "dataset_id": foreign.json()["id"]}), 422)


def test_metrics_need_the_metrics_scope(stack):
    base = stack["bases"][0]
    _problem(http(base).get("/metrics"), 401)
    _problem(http(base, stack["keys"]["reader"]).get("/metrics"), 403)
    r = http(base, stack["keys"]["prometheus"]).get("/metrics")
    assert r.status_code == 200 and "nnm_jobs_active" in r.text
    assert http(base).get("/healthz").status_code == 200


def test_auto_preset_is_resolved_at_submission(stack, tmp_path):
    alice = http(stack["bases"][0], stack["keys"]["alice"])
    for job in alice.get("/v1/jobs", params={"status": "queued"}).json()["items"]:
        alice.post(f"/v1/jobs/{job['id']}/cancel")
    dataset = alice.post("/v1/datasets", json={"builtin": "digits"}).json()
    r = alice.post("/v1/jobs", json={"type": "pretext", "dataset_id": dataset["id"]})
    assert r.status_code == 202, r.text
    job = r.json()
    # The gateway's NNM_DEVICE=cpu names the training workers' device: `auto` became `cpu` at submission.
    assert job["params"]["preset"] == "cpu" and job["params"]["runtime"]["device"] == "cpu"
    assert job["config"]["runtime"]["device"] == "cpu" and job["config"]["pretext"]["epochs"] > 0
    assert alice.get(f"/v1/jobs/{job['id']}").json()["config"] == job["config"]
    alice.post(f"/v1/jobs/{job['id']}/cancel")


def test_auto_mode_never_reopens_after_the_last_key_is_revoked(tmp_path):
    from nnm.service.auth import KeyStore
    from nnm.service.context import ServiceContext
    from nnm.service.gateway.deps import Gateway
    from nnm.service.settings import load_settings

    ctx = ServiceContext.from_settings(load_settings(env={}, data_dir=tmp_path), migrate=True)
    try:
        assert Gateway(ctx=ctx, queue=None, models=None).keys_required() is False  # nothing yet: open
        keys = KeyStore(ctx.jobs)
        _, row = keys.create("only", ["read", "write"])
        assert keys.revoke(row.id)
        assert not keys.any_active()
        # A fresh gateway (no cached answer) after the only key was revoked: still closed.
        assert Gateway(ctx=ctx, queue=None, models=None).keys_required() is True
    finally:
        ctx.close()


def test_names_too_long_for_the_database_are_refused_not_500(stack):
    carol = http(stack["bases"][0], stack["keys"]["carol"])
    _problem(carol.post("/v1/datasets", json={"builtin": "digits", "name": "n" * 201}), 422)
    _problem(carol.post("/v1/datasets", json={"builtin": "digits", "name": "nul\u0000name"}), 422)
    archive = digits_zip(20)
    r = carol.post("/v1/datasets", files={"file": ("a.zip", archive, "application/zip")}, data={"name": "n" * 300})
    assert "200" in _problem(r, 422)["detail"]
    long_file = "f" * 300 + ".zip"  # no name given: the file name is used, cut to fit
    r = carol.post("/v1/datasets", files={"file": (long_file, archive, "application/zip")})
    assert r.status_code == 201, r.text[:300]
    assert r.json()["name"] == long_file[:200]


def test_healthz_answers_while_postgres_stalls(tmp_path):
    """SIGSTOP the database: requests that need it hang, /healthz must not (it is the liveness probe)."""
    with own_postgres() as (url, server):
        env = {k: v for k, v in os.environ.items() if not k.startswith("NNM_")}
        env.update({"NNM_DATABASE_URL": url, "NNM_DATA_DIR": str(tmp_path / "data"), "NNM_RECONCILE_INTERVAL_S": "0"})
        proc, base = start_gateway(env, tmp_path / "gateway.log")
        stuck: list[int] = []
        try:
            os.killpg(server.proc.pid, signal.SIGSTOP)
            try:
                def hang(_: int) -> None:
                    try:
                        stuck.append(httpx.get(f"{base}/v1/jobs", timeout=40).status_code)
                    except httpx.TransportError:
                        stuck.append(-1)

                threads = [threading.Thread(target=hang, args=(i,), daemon=True) for i in range(60)]
                for t in threads:
                    t.start()
                time.sleep(3)  # every worker thread of the gateway is now waiting on the database
                timings = []
                for _ in range(5):
                    started = time.monotonic()
                    r = httpx.get(f"{base}/healthz", timeout=5)
                    timings.append(time.monotonic() - started)
                    assert r.status_code == 200
                assert max(timings) < 2.0, timings
            finally:
                os.killpg(server.proc.pid, signal.SIGCONT)
            for t in threads:
                t.join(60)
            figure("healthz_during_postgres_stall", max_seconds=round(max(timings), 3), stuck_requests=60)
        finally:
            stop(proc)


def test_other_owners_cannot_delete_and_active_jobs_hold_their_inputs(stack):
    alice, carol = (http(stack["bases"][0], stack["keys"][k]) for k in ("alice", "carol"))
    for job in alice.get("/v1/jobs", params={"status": "queued"}).json()["items"]:
        alice.post(f"/v1/jobs/{job['id']}/cancel")
    dataset = alice.post("/v1/datasets", json={"builtin": "digits"}).json()
    job = alice.post("/v1/jobs", json={"type": "pretext", "dataset_id": dataset["id"],
                                       "params": {"preset": "quick"}}).json()
    _problem(carol.delete(f"/v1/datasets/{dataset['id']}"), 404)
    _problem(carol.delete(f"/v1/jobs/{job['id']}"), 404)
    assert job["id"] in _problem(alice.delete(f"/v1/datasets/{dataset['id']}"), 409)["jobs"]
    _problem(alice.delete(f"/v1/jobs/{job['id']}"), 409)
    assert alice.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    assert alice.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert alice.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
    _problem(alice.get(f"/v1/datasets/{dataset['id']}"), 404)


def test_an_s3_outage_does_not_make_the_gateway_unready(tmp_path):
    """Readiness follows the database and the broker; requests that need the store answer 503 + Retry-After."""
    from fastapi.testclient import TestClient
    from nnm.service.context import ServiceContext
    from nnm.service.gateway.app import create_app
    from nnm.service.settings import load_settings

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    settings = load_settings(env={}, data_dir=tmp_path, s3_endpoint=f"127.0.0.1:{dead}", s3_access_key="k",
                             s3_secret_key="s", reconcile_interval_s=0)
    ctx = ServiceContext.from_settings(settings, migrate=True)
    ctx.store.attempts, ctx.store.backoff_s = 2, 0.1  # fail fast; the behaviour is what is tested
    ds = ctx.jobs.add_dataset(owner="public", name="d", kind="builtin", builtin="digits", split=None, key=None,
                              image_count=1797, image_size=8, channels=1, classes=None, size_bytes=None)
    row, _ = ctx.jobs.create_job(owner="public", type="pretext", dataset_id=ds.id, inputs={}, params={},
                                 queue="gpu", max_attempts=3)
    from nnm.service.store.db import ArtifactRow

    with ctx.jobs.session() as s:
        s.add(ArtifactRow(job_id=row.id, name="metrics.json", key=f"jobs/{row.id}/metrics.json", size=10))
    with TestClient(create_app(ctx)) as api:
        r = api.get("/readyz")
        assert r.status_code == 200, r.text
        assert r.json()["checks"]["store"].startswith("unavailable")
        r = api.get(f"/v1/jobs/{row.id}/artifacts/metrics.json")
        assert r.status_code == 503 and r.headers["retry-after"]
        assert r.headers["content-type"].startswith("application/problem+json")
        assert api.get(f"/v1/jobs/{row.id}").status_code == 200  # what needs only the database still works


def test_no_path_into_another_owners_objects_on_the_local_store(tmp_path):
    """Embedded mode (SQLite, a local artifact directory): `backbone:../../jobs/...` named a file that
    exists in the store, another owner's model, and was accepted. Now it is refused as not an id."""
    from fastapi.testclient import TestClient
    from nnm.service.context import ServiceContext
    from nnm.service.gateway.app import create_app
    from nnm.service.jobspec import SpecError, uploaded_backbone
    from nnm.service.settings import load_settings

    ctx = ServiceContext.from_settings(load_settings(env={}, data_dir=tmp_path, reconcile_interval_s=0), migrate=True)
    victim = "jobs/job_" + "a" * 32 + "/a1/pretext/model.pt"
    ctx.store.put_bytes(victim, b"someone else's weights")
    hostile = "backbone:../../" + victim.removesuffix(".pt")
    assert ctx.store.exists(f"backbones/public/{hostile.removeprefix('backbone:')}.pt")  # the hole was real
    with TestClient(create_app(ctx)) as api:
        dataset = api.post("/v1/datasets", json={"builtin": "digits"}).json()
        for job_type in ("pretext", "pipeline"):
            r = api.post("/v1/jobs", json={"type": job_type, "dataset_id": dataset["id"],
                                           "params": {"preset": "quick", "pretext": {"init": hostile}}})
            assert r.status_code == 422 and "uploaded backbone" in r.json()["detail"], r.text
        assert api.get("/v1/jobs").json()["items"] == []
    with pytest.raises(SpecError):  # the worker checks it again before it fetches anything
        uploaded_backbone(hostile)
