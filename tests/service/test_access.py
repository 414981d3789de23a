"""Access control against a real gateway process with API keys required (its own database)."""

from __future__ import annotations

import time

import httpx
import pytest
from nnm.service.auth import KeyStore
from nnm.service.store.db import ModelRow, new_id
from nnm.service.store.migrations import upgrade
from nnm.service.store.repository import JobStore

from .conftest import digits_zip
from .servers import postgres_database, start_gateway, stop

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def secured(service_env, infra, tmp_path_factory):
    root = tmp_path_factory.mktemp("secured")
    with postgres_database() as url:
        upgrade(url)
        jobs = JobStore(url)
        keys = KeyStore(jobs)
        alice, alice_row = keys.create("alice", ["read", "write"], max_queued_jobs=2, uploads_per_minute=3)
        bob, _ = keys.create("bob", ["read", "write"])
        reader, _ = keys.create("reader", ["read"])
        revoked, revoked_row = keys.create("old", ["read", "write"])
        keys.revoke(revoked_row.id)
        env = {**service_env, "NNM_DATABASE_URL": url, "NNM_AUTH": "required", "NNM_DATA_DIR": str(root),
               "NNM_RECONCILE_INTERVAL_S": "0"}
        proc, base = start_gateway(env, root / "gateway.log")
        try:
            yield {"base": base, "jobs": jobs, "alice": alice, "alice_id": alice_row.id, "bob": bob,
                   "reader": reader, "revoked": revoked, "log": root / "gateway.log"}
        finally:
            stop(proc)
            jobs.dispose()


def http(base: str, key: str | None) -> httpx.Client:
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=60)


def test_keys_are_required(secured):
    anonymous = http(secured["base"], None)
    r = anonymous.get("/v1/jobs")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert r.headers["content-type"].startswith("application/problem+json")
    assert anonymous.get("/healthz").status_code == 200  # health stays open for orchestrators
    for bad in ("nnm_not-a-key", secured["revoked"]):
        r = http(secured["base"], bad).get("/v1/datasets")
        assert r.status_code == 401 and bad not in r.text
    assert httpx.get(f"{secured['base']}/v1/jobs", headers={"X-API-Key": secured["bob"]}).status_code == 200


def test_scopes(secured):
    reader = http(secured["base"], secured["reader"])
    assert reader.get("/v1/datasets").status_code == 200
    r = reader.post("/v1/datasets", json={"builtin": "digits"})
    assert r.status_code == 403 and "write" in r.json()["detail"]


def test_objects_belong_to_their_key(secured):
    alice, bob = http(secured["base"], secured["alice"]), http(secured["base"], secured["bob"])
    ds = alice.post("/v1/datasets", json={"builtin": "digits"}).json()
    job = alice.post("/v1/jobs", json={"type": "pretext", "dataset_id": ds["id"], "params": {"preset": "quick"}})
    assert job.status_code == 202
    job = job.json()
    model_id = new_id("mdl")
    with secured["jobs"].session() as s:
        s.add(ModelRow(id=model_id, owner=secured["alice_id"], job_id=job["id"], dataset_id=ds["id"],
                       key_prefix=f"jobs/{job['id']}/model", clusters=10, class_names=None, metrics=None))
    for path in (f"/v1/datasets/{ds['id']}", f"/v1/jobs/{job['id']}", f"/v1/models/{model_id}",
                 f"/v1/jobs/{job['id']}/artifacts/metrics.json"):
        assert alice.get(path).status_code in {200, 404 if "artifacts" in path else 200}
        r = bob.get(path)
        assert r.status_code == 404, path
        assert ds["id"] not in r.text or path.endswith(ds["id"])  # never the object itself
    assert bob.post(f"/v1/jobs/{job['id']}/cancel").status_code == 404
    files = [("files", ("x.png", b"\x89PNG", "image/png"))]
    assert bob.post(f"/v1/models/{model_id}/assign", files=files).status_code == 404
    assert bob.post("/v1/jobs", json={"type": "pretext", "dataset_id": ds["id"]}).status_code == 422
    assert ds["id"] not in bob.get("/v1/datasets").text
    assert job["id"] not in bob.get("/v1/jobs").text
    assert alice.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202


def test_queued_job_limit(secured):
    alice = http(secured["base"], secured["alice"])
    ds = alice.post("/v1/datasets", json={"builtin": "digits"}).json()
    statuses = [alice.post("/v1/jobs", json={"type": "pretext", "dataset_id": ds["id"],
                                             "params": {"preset": "quick"}}) for _ in range(3)]
    codes = [r.status_code for r in statuses]
    assert codes.count(429) >= 1, codes
    limited = statuses[codes.index(429)]
    assert int(limited.headers["retry-after"]) > 0 and "limit" in limited.json()["detail"]
    for r in statuses:
        if r.status_code == 202:
            alice.post(f"/v1/jobs/{r.json()['id']}/cancel")


def test_upload_rate_limit(secured):
    alice = http(secured["base"], secured["alice"])
    zipped = digits_zip(20)
    codes = []
    for _ in range(4):
        r = alice.post("/v1/datasets", files={"file": ("d.zip", zipped, "application/zip")})
        codes.append(r.status_code)
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
    assert 429 in codes, codes


def test_no_secrets_in_openapi_or_logs(secured):
    spec = httpx.get(f"{secured['base']}/openapi.json").text
    assert "key_hash" not in spec and secured["alice"] not in spec
    assert '"bearerAuth"' in spec or "HTTPBearer" in spec
    time.sleep(0.5)
    log = secured["log"].read_text()
    for key in (secured["alice"], secured["bob"], secured["reader"]):
        assert key not in log
