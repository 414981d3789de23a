"""Access control against a real gateway process with API keys required (its own database)."""

from __future__ import annotations

import json
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

ADMIN_KEY = "admin-" + "0123456789abcdef" * 3


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
               "NNM_RECONCILE_INTERVAL_S": "0", "NNM_ADMIN_KEY": ADMIN_KEY}
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


def test_admin_api_manages_keys(secured):
    """The admin key creates a key over HTTP (no database access), the key works at once with the scopes
    and limits asked for, shows up in the list without its secret, and stops working when revoked."""
    admin = http(secured["base"], ADMIN_KEY)
    r = admin.post("/v1/admin/keys", json={"name": "carol", "scopes": ["read"], "max_queued_jobs": 7})
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["key"].startswith("nnm_") and created["scopes"] == ["read"] and created["max_queued_jobs"] == 7
    carol = http(secured["base"], created["key"])
    assert carol.get("/v1/datasets").status_code == 200
    assert carol.post("/v1/datasets", json={"builtin": "digits"}).status_code == 403  # read only
    listed = admin.get("/v1/admin/keys").json()["items"]
    mine = next(k for k in listed if k["id"] == created["id"])
    assert mine["name"] == "carol" and mine["revoked_at"] is None and "key" not in mine
    assert {"alice", "bob", "reader", "old"} <= {k["name"] for k in listed}
    assert all("key" not in k and "key_hash" not in k for k in listed)
    with secured["jobs"].session() as s:  # only the hash is stored
        from nnm.service.store.db import ApiKeyRow

        assert created["key"] not in str(s.get(ApiKeyRow, created["id"]).key_hash)
    assert admin.delete(f"/v1/admin/keys/{created['id']}").status_code == 204
    assert carol.get("/v1/datasets").status_code == 401
    r = admin.delete(f"/v1/admin/keys/{created['id']}")
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/problem+json")


def test_admin_api_needs_the_admin_scope(secured):
    """Anonymous: 401; a data key: 403; a wrong admin key: 401. The admin key itself reads no data."""
    r = http(secured["base"], None).get("/v1/admin/keys")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    for key in (secured["alice"], secured["reader"]):
        r = http(secured["base"], key).post("/v1/admin/keys", json={"name": "escalate", "scopes": ["admin"]})
        assert r.status_code == 403 and "admin" in r.json()["detail"]
    assert http(secured["base"], ADMIN_KEY[:-1] + "x").get("/v1/admin/keys").status_code == 401
    admin = http(secured["base"], ADMIN_KEY)
    assert admin.get("/v1/datasets").status_code == 403
    assert admin.get("/metrics").status_code == 403


def test_admin_api_refuses_bad_requests(secured):
    admin = http(secured["base"], ADMIN_KEY)
    for body, field in (({"name": "x", "scopes": ["root"]}, "scopes"), ({"name": ""}, "name"),
                        ({"name": "x", "scopes": []}, "scopes"), ({"name": "x", "max_running_jobs": 0}, "max_running"),
                        ({"name": "x", "key_hash": "0" * 64}, "key_hash"), ({"name": "a\x00b"}, "name")):
        r = admin.post("/v1/admin/keys", json=body)
        assert r.status_code == 422, (body, r.text)
        assert r.headers["content-type"].startswith("application/problem+json") and field in r.text
    before = len(admin.get("/v1/admin/keys").json()["items"])
    assert admin.post("/v1/admin/keys", content=b"{", headers={"content-type": "application/json"}).status_code == 400
    assert len(admin.get("/v1/admin/keys").json()["items"]) == before  # nothing half written


def test_remote_cli_manages_keys(secured):
    """`nnm remote keys` with the admin key, then `nnm remote` with the key it printed."""
    from .test_remote_cli import lines, nnm

    made = nnm(secured["base"], "keys", "create", "--name", "dave", "--scopes", "read,write", "--max-running", "1",
               key=ADMIN_KEY)
    assert made.returncode == 0, made.stderr
    dave = json.loads(made.stdout)
    assert dave["max_running_jobs"] == 1 and "only its hash is kept" in made.stderr
    assert nnm(secured["base"], "jobs", key=dave["key"]).returncode == 0
    listed = nnm(secured["base"], "keys", "list", key=ADMIN_KEY)
    assert dave["id"] in {k["id"] for k in lines(listed.stdout)}
    denied = nnm(secured["base"], "keys", "list", key=dave["key"])
    assert denied.returncode == 2 and "403" in denied.stderr
    assert nnm(secured["base"], "keys", "revoke", dave["id"], key=ADMIN_KEY).returncode == 0
    r = nnm(secured["base"], "jobs", key=dave["key"])
    assert r.returncode == 2 and "401" in r.stderr


def test_a_generated_client_drives_the_api(secured, tmp_path):
    """openapi-python-client generates a typed client from api_schemas/openapi.json; it submits, reads,
    lists and cancels a job with typed params and config, manages keys, and gets problems as Problem."""
    import importlib
    import subprocess
    import sys
    from pathlib import Path

    spec = Path(__file__).resolve().parents[2] / "api_schemas" / "openapi.json"
    generator = Path(sys.executable).parent / "openapi-python-client"
    out = subprocess.run([str(generator), "generate", "--path", str(spec), "--meta", "none",
                          "--output-path", str(tmp_path / "nnm_client")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and (tmp_path / "nnm_client" / "api" / "jobs" / "create_job.py").exists(), out.stderr
    sys.path.insert(0, str(tmp_path))
    try:
        gen = importlib.import_module("nnm_client")
        api = {name: importlib.import_module(f"nnm_client.api.{name}") for name in ("jobs", "admin")}
        jobs = {op: importlib.import_module(f"nnm_client.api.jobs.{op}")
                for op in ("create_job", "get_job", "list_jobs", "cancel_job")}
        admin = {op: importlib.import_module(f"nnm_client.api.admin.{op}")
                 for op in ("create_key", "list_keys", "revoke_key")}
        models = importlib.import_module("nnm_client.models")
        assert api["jobs"] and api["admin"]
        bob = gen.AuthenticatedClient(base_url=secured["base"], token=secured["bob"])
        dataset = http(secured["base"], secured["bob"]).post("/v1/datasets", json={"builtin": "digits"}).json()
        params = models.JobParams.from_dict({"preset": "quick", "pretext": {"epochs": 1}, "cluster": {"clusters": 10}})
        job = jobs["create_job"].sync(client=bob, body=models.JobCreate(
            type_=models.JobType.PRETEXT, dataset_id=dataset["id"], params=params))
        assert isinstance(job, models.JobOut) and job.status == models.JobStatus.QUEUED
        got = jobs["get_job"].sync(job.id, client=bob)
        assert isinstance(got.params, models.JobParams) and got.params.preset == models.JobParamsPreset.QUICK
        assert isinstance(got.config, models.PipelineConfig) and got.config.pretext.epochs == 1
        assert job.id in [j.id for j in jobs["list_jobs"].sync(client=bob).items]
        cancelled = jobs["cancel_job"].sync(job.id, client=bob)
        assert cancelled.status in (models.JobStatus.CANCELLING, models.JobStatus.CANCELLED)
        missing = jobs["get_job"].sync("job_" + "0" * 32, client=bob)
        assert isinstance(missing, models.Problem) and missing.status == 404
        root = gen.AuthenticatedClient(base_url=secured["base"], token=ADMIN_KEY)
        key = admin["create_key"].sync(client=root, body=models.KeyCreate(
            name="generated", scopes=[models.KeyCreateScopesItem.READ]))
        assert isinstance(key, models.KeyCreated) and key.key.startswith("nnm_")
        assert key.id in [k.id for k in admin["list_keys"].sync(client=root).items]
        assert admin["revoke_key"].sync_detailed(key.id, client=root).status_code == 204
        denied = admin["list_keys"].sync(client=bob)
        assert isinstance(denied, models.Problem) and denied.status == 403
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == "nnm_client" or m.startswith("nnm_client.")]:
            del sys.modules[name]
