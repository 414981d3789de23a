"""DELETE of datasets, jobs and models (owner-checked, refused while a queued or running job needs
them, files removed from S3), and the retention of finished jobs' artifacts."""

from __future__ import annotations

from datetime import timedelta

import pytest
from nnm.service.client import ApiError

from .conftest import FAST_PIPELINE, digit_png, digits_zip

pytestmark = pytest.mark.slow


def _keys(infra, prefix: str) -> list[str]:
    s3 = infra["s3"]
    return [o.object_name for o in s3["client"].list_objects(s3["bucket"], prefix=prefix, recursive=True)]


def _status(call) -> int:
    try:
        call()
    except ApiError as exc:
        assert exc.problem.get("detail"), exc.problem
        return exc.status
    return 0


def test_delete_dataset_job_and_model(client, worker, infra, tmp_path):
    path = tmp_path / "digits.zip"
    path.write_bytes(digits_zip(200))
    dataset = client.upload_dataset(path, name="to-delete")
    assert _keys(infra, f"datasets/{dataset['id']}/")
    job = client.submit("pipeline", dataset["id"], {**FAST_PIPELINE, "runtime": {"seed": 3}})
    delete = client.http.delete
    # Queued or running: neither the job nor its dataset can go.
    r = delete(f"/v1/jobs/{job['id']}")
    assert r.status_code == 409 and "cancel it first" in r.json()["detail"]
    r = delete(f"/v1/datasets/{dataset['id']}")
    assert r.status_code == 409 and job["id"] in r.json()["jobs"]
    final = client.wait(job["id"], timeout=600)
    assert final["status"] == "succeeded", final.get("error")
    model_id = final["model_id"]

    # A model an evaluate job is using stays until that job ends.
    evaluation = client.submit("evaluate", dataset["id"], {"preset": "quick"}, inputs={"model_id": model_id})
    r = delete(f"/v1/models/{model_id}")
    assert r.status_code == 409 and evaluation["id"] in r.json()["jobs"]
    assert client.wait(evaluation["id"], timeout=300)["status"] == "succeeded"

    model_prefix = f"jobs/{job['id']}/"
    assert any("/model/" in k for k in _keys(infra, model_prefix))
    assert delete(f"/v1/models/{model_id}").status_code == 204
    assert client.http.get(f"/v1/models/{model_id}").status_code == 404
    assert client.http.post(f"/v1/models/{model_id}/assign",
                            files=[("files", ("a.png", digit_png(0), "image/png"))]).status_code == 404
    assert not any("/model/" in k for k in _keys(infra, model_prefix))
    after = client.job(job["id"])
    assert after["model_id"] is None and not any(a["name"].startswith("model/") for a in after["artifacts"])
    assert client.artifact(job["id"], "metrics.json")  # the rest of the job is still there

    assert delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert client.http.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert client.http.get(f"/v1/jobs/{job['id']}/artifacts/metrics.json").status_code == 404
    assert _keys(infra, model_prefix) == []
    assert delete(f"/v1/jobs/{job['id']}").status_code == 404

    assert delete(f"/v1/datasets/{dataset['id']}").status_code == 204
    assert client.http.get(f"/v1/datasets/{dataset['id']}").status_code == 404
    listed = client.http.get("/v1/datasets", params={"limit": 200}).json()["items"]
    assert dataset["id"] not in {d["id"] for d in listed}
    assert _keys(infra, f"datasets/{dataset['id']}/") == []
    r = client.http.post("/v1/jobs", json={"type": "pretext", "dataset_id": dataset["id"]})
    assert r.status_code == 422
    # The evaluate job that used the deleted model and dataset is still listed with its results.
    assert client.job(evaluation["id"])["status"] == "succeeded"


def test_retention_expires_finished_artifacts_but_keeps_model_and_metrics(tmp_path):
    from nnm.service.context import ServiceContext
    from nnm.service.settings import load_settings
    from nnm.service.store.db import ArtifactRow, JobRow, utcnow
    from nnm.service.store.retention import sweep_once

    ctx = ServiceContext.from_settings(load_settings(env={}, data_dir=tmp_path, artifact_retention_days=7),
                                       migrate=True)
    try:
        jobs, store = ctx.jobs, ctx.store
        ds = jobs.add_dataset(owner="public", name="d", kind="builtin", builtin="digits", split=None, key=None,
                              image_count=1797, image_size=8, channels=1, classes=None, size_bytes=None)

        def finished_job(days_ago: float) -> str:
            row, _ = jobs.create_job(owner="public", type="pipeline", dataset_id=ds.id, inputs={}, params={},
                                     queue="gpu", max_attempts=3)
            names = ["metrics.json", "mine/neighbors.npy", "pretext/model.pt", "model/model.pt", "model/model.json"]
            items = []
            for name in names:
                key = f"jobs/{row.id}/{name}"
                items.append((name, key, store.put_bytes(key, b"x" * 10)))
            with jobs.session() as s:  # recorded as a finished job's worker would have
                for name, key, size in items:
                    s.add(ArtifactRow(job_id=row.id, name=name, key=key, size=size))
                j = s.get(JobRow, row.id)
                j.status, j.finished_at = "succeeded", utcnow() - timedelta(days=days_ago)
            store.put_bytes(f"jobs/{row.id}/a9/leftover.bin", b"y")  # from a lost attempt: no record
            return row.id

        old, recent, needed = finished_job(10), finished_job(1), finished_job(10)
        # A queued job still needs `needed` as its input: it keeps everything.
        jobs.create_job(owner="public", type="mine", dataset_id=ds.id, inputs={"pretext_job_id": needed},
                        params={}, queue="gpu", max_attempts=3)
        assert sweep_once(ctx) == [old]
        kept = {a.name for a in jobs.artifacts(old)}
        assert kept == {"metrics.json", "model/model.pt", "model/model.json"}
        assert sorted(store.list(f"jobs/{old}/")) == sorted(f"jobs/{old}/{n}" for n in kept)
        for job_id in (recent, needed):
            assert len(jobs.artifacts(job_id)) == 5 and len(store.list(f"jobs/{job_id}/")) == 6
        assert any(e.kind == "artifacts-expired" for e in jobs.events(old))
        assert sweep_once(ctx) == []  # nothing left to expire
    finally:
        ctx.close()

