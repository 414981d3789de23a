"""The service with real parts: Postgres, Redis, a SeaweedFS S3 server, a Celery worker process and
the gateway process, started as docker-compose starts them."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time

import httpx
import pytest
from nnm.service.client import ApiError, Client
from PIL import Image

from .conftest import FAST_PIPELINE, child_processes_of, digit_png, digits_zip, figure

pytestmark = pytest.mark.slow


def test_health_endpoints(client: Client):
    assert client.http.get("/healthz").json()["status"] == "ok"
    ready = client.http.get("/readyz").json()
    assert ready == {"status": "ready", "checks": {"database": "ok", "broker": "ok", "store": "ok"}}
    assert client.http.get("/no-such-page").status_code == 404
    metrics = client.http.get("/metrics")
    assert metrics.status_code == 200
    # Counted per route template and status, the guard's and the router's answers alike.
    assert 'nnm_http_requests_total{method="GET",route="/readyz",status="200"}' in metrics.text
    assert 'nnm_http_requests_total{method="GET",route="unmatched",status="404"}' in metrics.text
    assert "nnm_jobs_active" in metrics.text


def test_upload_is_validated_and_listed(client: Client, uploaded_digits: dict, infra):
    assert uploaded_digits["image_count"] == 300
    assert uploaded_digits["classes"] == [str(i) for i in range(10)] and uploaded_digits["labelled"]
    assert uploaded_digits["channels"] == 1 and uploaded_digits["image_size"] == 8
    assert client.http.get(f"/v1/datasets/{uploaded_digits['id']}").json() == uploaded_digits
    listed = client.http.get("/v1/datasets").json()["items"]
    assert uploaded_digits["id"] in [d["id"] for d in listed]
    keys = [o.object_name for o in infra["s3"]["client"].list_objects("nnm", prefix="datasets/", recursive=True)]
    assert f"datasets/{uploaded_digits['id']}/data.zip" in keys


def test_pipeline_job_end_to_end(client: Client, worker, infra, tmp_path):
    # 960 digits (this stack admits at most 1,000 files per upload), so that each stage lasts several
    # 1-s progress heartbeats even on a fast machine.
    (tmp_path / "digits-960.zip").write_bytes(digits_zip(960))
    dataset = client.upload_dataset(tmp_path / "digits-960.zip", name="digits-960")
    job = client.submit("pipeline", dataset["id"], FAST_PIPELINE)
    assert job["status"] in {"queued", "running"}
    seen = []

    def record(j: dict) -> None:
        p = j.get("progress") or {}
        seen.append((j["status"], p.get("stage"), p.get("fraction"), p.get("updated_at")))

    final = client.wait(job["id"], timeout=900, poll_s=0.5, on_update=record)
    assert final["status"] == "succeeded", final["error"]
    # Progress moved while it ran: several stages and several distinct fractions were observed.
    assert len({s[1] for s in seen if s[1]}) >= 3
    assert len({s[2] for s in seen if s[2] is not None}) >= 3
    assert final["attempt"] == 1 and final["model_id"]
    assert {"acc", "nmi", "ari"} <= final["metrics"].keys()
    assert [s["status"] for s in final["stages"]] == ["succeeded"] * 5
    names = {a["name"] for a in final["artifacts"]}
    assert {
        "metrics.json",
        "confusion_matrix.png",
        "confusion_matrix.json",
        "prototypes.png",
        "mine/neighbors.npy",
        "model/model.pt",
        "pretext/model.pt",
        "assignments.csv",
    } <= names
    png = client.artifact(final["id"], "confusion_matrix.png")
    with Image.open(io.BytesIO(png)) as im:
        im.load()
        assert im.format == "PNG" and im.size[0] > 100
    metrics = json.loads(client.artifact(final["id"], "metrics.json"))
    assert metrics["acc"] == final["metrics"]["acc"]
    # Artifacts live in S3 under deterministic keys: the job's prefix, then the attempt that wrote them.
    keys = {
        o.object_name for o in infra["s3"]["client"].list_objects("nnm", prefix=f"jobs/{final['id']}/", recursive=True)
    }
    prefix = f"jobs/{final['id']}/a{final['attempt']}"
    assert f"{prefix}/confusion_matrix.png" in keys and f"{prefix}/model/model.pt" in keys
    # The model is listed and assigns uploaded images like `nnm assign` does with the same files.
    model = client.http.get(f"/v1/models/{final['model_id']}").json()
    assert model["clusters"] == 10 and model["job_id"] == final["id"]
    files = [(f"d{i}.png", digit_png(i)) for i in range(8)]
    got = client.assign(final["model_id"], files)
    assert [g["filename"] for g in got] == [f for f, _ in files]
    model_dir = tmp_path / "model"
    for name in ("model.json", "model.pt"):
        (model_dir / name).parent.mkdir(exist_ok=True)
        (model_dir / name).write_bytes(client.artifact(final["id"], f"model/{name}"))
    for name, data in files:
        (tmp_path / name).write_bytes(data)
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "nnm.cli.main",
            "assign",
            "--model",
            str(model_dir),
            *[str(tmp_path / n) for n, _ in files],
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    expected = [json.loads(line) for line in cli.stdout.splitlines()]
    assert [g["cluster"] for g in got] == [e["cluster"] for e in expected]
    assert [round(g["confidence"], 4) for g in got] == [round(e["confidence"], 4) for e in expected]
    assert all(g["class_name"] in model["class_names"] for g in got)


def test_pipeline_estimates_the_number_of_clusters(client: Client, worker, uploaded_digits: dict):
    """clusters "auto": an estimate stage runs between mining and clustering, its curve is an artifact, and
    the model, the metrics and the cluster browser all have the estimated number of clusters."""
    params = FAST_PIPELINE | {"cluster": {"epochs": 2, "clusters": "auto"}, "estimate": {"max_clusters": 20}}
    final = client.wait(client.submit("pipeline", uploaded_digits["id"], params)["id"], timeout=900)
    assert final["status"] == "succeeded", final["error"]
    assert [s["name"] for s in final["stages"]] == ["pretext", "mine", "estimate", "cluster", "selflabel", "evaluate"]
    assert all(s["status"] == "succeeded" for s in final["stages"])
    est = json.loads(client.artifact(final["id"], "estimate/estimate.json"))
    k = est["clusters"]
    assert 2 <= k <= 20 and est["max_clusters"] == 20 and est["criterion"] == "modularity"
    assert final["metrics"]["estimated_clusters"]["clusters"] == k
    with Image.open(io.BytesIO(client.artifact(final["id"], "estimate/curve.png"))) as im:
        assert im.format == "PNG"
    assert client.http.get(f"/v1/models/{final['model_id']}").json()["clusters"] == k
    clusters = client.http.get(f"/v1/jobs/{final['id']}/clusters").json()["clusters"]
    assert len(clusters) == k


def test_large_artifacts_redirect_to_a_presigned_url(client: Client, worker, uploaded_digits: dict):
    jobs = client.http.get("/v1/jobs", params={"status": "succeeded", "type": "pipeline"}).json()["items"]
    if not jobs:
        job = client.wait(client.submit("pipeline", uploaded_digits["id"], FAST_PIPELINE)["id"], timeout=900)
    else:
        job = jobs[0]
    big = [a for a in job["artifacts"] if a["size"] > 1_000_000]
    small = [a for a in job["artifacts"] if a["size"] < 1_000_000]
    assert small and big
    r = client.http.get(small[0]["url"])
    assert r.status_code == 200 and len(r.content) == small[0]["size"]
    for art in big:
        r = client.http.get(art["url"], follow_redirects=False)
        assert r.status_code == 307
        url = r.headers["location"]
        assert "X-Amz-Signature" in url and "X-Amz-Expires=4&" in url
        assert len(httpx.get(url).content) == art["size"]
    time.sleep(6)  # the URL stops working once its expiry has passed
    assert httpx.get(url).status_code == 403


def test_cancel_a_running_job(client: Client, worker, uploaded_digits: dict):
    long = {"preset": "quick", "pretext": {"epochs": 300}}
    job = client.submit("pipeline", uploaded_digits["id"], long)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        j = client.job(job["id"])
        if j["status"] == "running" and (j.get("progress") or {}).get("epoch"):
            break
        time.sleep(0.5)
    assert child_processes_of(job["id"]), "the training child should be running"
    started = time.monotonic()
    assert client.cancel(job["id"])["status"] == "cancelling"
    final = client.wait(job["id"], timeout=60, poll_s=0.2)
    took = time.monotonic() - started
    assert final["status"] == "cancelled" and took < 15, took
    time.sleep(1)
    assert child_processes_of(job["id"]) == []
    figure("cancel a running training job", seconds_to_cancelled=round(took, 1), child_processes_left=0)
    with pytest.raises(ApiError) as err:
        client.cancel(job["id"])
    assert err.value.status == 409


def test_cancel_a_queued_job_ends_it_at_once(client: Client, worker, uploaded_digits: dict):
    # The worker's one slot is kept busy by a long job, so the next job waits in the queue;
    # cancelling that one ends it at once, without a worker.
    long = {"preset": "quick", "pretext": {"epochs": 300}}
    busy = client.submit("pipeline", uploaded_digits["id"], long)
    deadline = time.monotonic() + 300
    while client.job(busy["id"])["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    job = client.submit("pipeline", uploaded_digits["id"], long)
    assert client.job(job["id"])["status"] == "queued"
    assert client.cancel(job["id"])["status"] == "cancelled"
    assert client.job(job["id"])["attempt"] == 0
    assert client.cancel(busy["id"])["status"] == "cancelling"
    assert client.wait(busy["id"], timeout=60)["status"] == "cancelled"


def test_bad_requests_are_problems(client: Client, uploaded_digits: dict):
    def problem(r: httpx.Response, status: int, fragment: str) -> None:
        assert r.status_code == status, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        body = r.json()
        assert body["status"] == status and fragment in body["detail"], body

    post = client.http.post
    problem(
        post(
            "/v1/jobs",
            json={"type": "pipeline", "dataset_id": uploaded_digits["id"], "params": {"pretext": {"epochs": -1}}},
        ),
        422,
        "pretext.epochs",
    )
    problem(
        post(
            "/v1/jobs",
            json={"type": "pipeline", "dataset_id": uploaded_digits["id"], "params": {"cluster": {"clusters": 1}}},
        ),
        422,
        "cluster.clusters",
    )
    problem(
        post(
            "/v1/jobs",
            json={"type": "pipeline", "dataset_id": uploaded_digits["id"], "params": {"cluster": {"clusters": 301}}},
        ),
        422,
        "fewer than the 301 clusters",
    )
    problem(
        post("/v1/jobs", json={"type": "pipeline", "dataset_id": uploaded_digits["id"], "params": {"preset": "turbo"}}),
        422,
        "unknown preset",
    )
    problem(post("/v1/jobs", json={"type": "pipeline", "dataset_id": "ds_nope"}), 422, "no dataset")
    problem(
        post("/v1/jobs", json={"type": "mine", "dataset_id": uploaded_digits["id"]}), 422, "needs inputs.pretext_job_id"
    )
    problem(post("/v1/jobs", json={"type": "teleport", "dataset_id": uploaded_digits["id"]}), 422, "type")
    problem(post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}), 400, "not valid JSON")
    problem(post("/v1/datasets", content=b"hello", headers={"content-type": "text/plain"}), 415, "text/plain")
    problem(post("/v1/datasets", json={"builtin": "imagenet"}), 422, "builtin")
    problem(client.http.get("/v1/jobs/job_missing"), 404, "no job")
    bad_zip = {"file": ("broken.zip", b"PK\x03\x04 not really a zip", "application/zip")}
    problem(post("/v1/datasets", files=bad_zip), 422, "not a readable .zip")


def test_idempotency_key(client: Client, uploaded_digits: dict):
    params = {"preset": "quick", "pretext": {"epochs": 1}}
    a = client.submit("pretext", uploaded_digits["id"], params, idempotency_key="key-1")
    b = client.submit("pretext", uploaded_digits["id"], params, idempotency_key="key-1")
    assert a["id"] == b["id"]
    with pytest.raises(ApiError) as err:
        client.submit("pretext", uploaded_digits["id"], {"preset": "quick"}, idempotency_key="key-1")
    assert err.value.status == 422
    client.cancel(a["id"]) if client.job(a["id"])["status"] in {"queued", "running"} else None


def test_job_list_is_keyset_paginated(client: Client, uploaded_digits: dict):
    ids = {client.submit("pretext", uploaded_digits["id"], {"preset": "quick"})["id"] for _ in range(3)}
    for job_id in ids:
        client.cancel(job_id)
    seen, cursor = [], None
    while True:
        page = client.http.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert ids <= set(seen) and len(seen) == len(set(seen))
    created = [client.job(i)["created_at"] for i in seen]
    assert created == sorted(created, reverse=True)


def test_a_burst_of_jobs_runs_each_exactly_once(client: Client, worker, uploaded_digits: dict, infra):
    from concurrent.futures import ThreadPoolExecutor

    from nnm.service.store.repository import JobStore

    body = {"type": "pretext", "dataset_id": uploaded_digits["id"], "params": {"preset": "quick", "pretext": {
        "epochs": 0}}}
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: client.http.post("/v1/jobs", json=body), range(12)))
    assert [r.status_code for r in responses] == [202] * 12
    ids = [r.json()["id"] for r in responses]
    assert len(set(ids)) == 12
    finals = [client.wait(i, timeout=900, poll_s=1) for i in ids]
    assert [f["status"] for f in finals] == ["succeeded"] * 12
    assert [f["attempt"] for f in finals] == [1] * 12
    store = JobStore(infra["database_url"])
    try:
        assert [sum(e.kind == "started" for e in store.events(i)) for i in ids] == [1] * 12
    finally:
        store.dispose()
