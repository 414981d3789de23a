"""Embedded mode: `nnm serve` with no settings (SQLite, local artifact directory, in-process workers)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from nnm.service.client import Client
from PIL import Image

from .conftest import FAST_PIPELINE, digit_png
from .servers import free_port, stop

pytestmark = pytest.mark.slow


def serve(data_dir, **settings: str) -> tuple[subprocess.Popen, Client]:
    """`nnm serve` on a free port with no NNM_* settings but `settings`; returns the process and a client."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNM_")} | settings
    with open(data_dir / f"serve-{port}.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nnm.cli.main", "serve", "--port", str(port), "--data-dir", str(data_dir)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, Client(f"http://127.0.0.1:{port}", timeout=120)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("embedded")
    proc, client = serve(data_dir)
    try:
        client.wait_ready(90)
        yield client, data_dir
    finally:
        client.close()
        stop(proc, timeout=60)


@pytest.fixture(scope="module")
def finished_pipeline(embedded) -> tuple[dict, set]:
    """A quick pipeline job on digits, run to the end; with the progress fractions seen while polling."""
    client, _ = embedded
    ds = client.builtin_dataset("digits")
    assert ds["image_count"] == 1797 and ds["labelled"]
    job = client.submit("pipeline", ds["id"], FAST_PIPELINE)
    fractions = set()
    final = client.wait(
        job["id"], timeout=900, poll_s=0.5, on_update=lambda j: fractions.add((j.get("progress") or {}).get("fraction"))
    )
    return final, fractions


def test_embedded_pipeline_assign_and_artifacts(embedded, finished_pipeline):
    client, data_dir = embedded
    assert client.http.get("/readyz").json()["status"] == "ready"
    final, fractions = finished_pipeline
    assert final["status"] == "succeeded", final["error"]
    assert len(fractions - {None}) >= 3
    assert 0.0 < final["metrics"]["acc"] <= 1.0
    with Image.open(io.BytesIO(client.artifact(final["id"], "prototypes.png"))) as im:
        im.load()
    assert (data_dir / "nnm.db").exists()
    # Each attempt writes under its own prefix (a stale attempt can never overwrite the current one's files).
    assert (data_dir / "artifacts" / "jobs" / final["id"] / f"a{final['attempt']}" / "confusion_matrix.png").exists()
    results = client.assign(final["model_id"], [("seven.png", digit_png(7)), ("zero.png", digit_png(0))])
    assert [r["filename"] for r in results] == ["seven.png", "zero.png"]
    assert all(0 <= r["cluster"] < 10 and 0 < r["confidence"] <= 1 for r in results)
    # Work directories of finished jobs are removed.
    time.sleep(0.5)
    assert not (data_dir / "work" / final["id"]).exists()


def test_concurrent_assign_requests_get_the_answers_of_single_ones(embedded, finished_pipeline):
    """Requests that arrive together share forward passes; each still gets its own images' answers."""
    client, _ = embedded
    model_id = finished_pipeline[0]["model_id"]
    images = [(f"{i}.png", digit_png(i)) for i in range(10)]
    alone = [client.assign(model_id, [image])[0] for image in images]
    with ThreadPoolExecutor(10) as pool:
        together = list(pool.map(lambda image: client.assign(model_id, [image])[0], images * 3))
    assert [t["filename"] for t in together] == [a["filename"] for a in alone] * 3
    assert [t["cluster"] for t in together] == [a["cluster"] for a in alone] * 3
    assert [t["confidence"] for t in together] == pytest.approx([a["confidence"] for a in alone] * 3, abs=1e-4)


def test_a_full_assign_queue_answers_503_with_retry_after(embedded, finished_pipeline):
    """Past the queue's images, a request is refused at once with a problem and Retry-After, not queued."""
    _, data_dir = embedded
    model_id = finished_pipeline[0]["model_id"]
    # A second gateway on the same data: room for one queued image, and a long collection window, so
    # the first request holds the queue while the others arrive.
    proc, client = serve(data_dir, NNM_ASSIGN_QUEUE_IMAGES="1", NNM_ASSIGN_BATCH_WINDOW_MS="900")
    try:
        client.wait_ready(90)
        start = threading.Barrier(4)

        def post(i: int):
            start.wait()
            return client.http.post(f"/v1/models/{model_id}/assign", files=[("files", (f"{i}.png", digit_png(i)))])

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(post, range(4)))
        statuses = sorted(r.status_code for r in answers)
        assert statuses[0] == 200 and statuses[-1] == 503, statuses
        for r in answers:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1"
                assert r.headers["content-type"] == "application/problem+json"
                problem = r.json()
                assert problem["type"] == "urn:nnm:problem:overloaded" and "retry shortly" in problem["detail"]
        # The queue drained: the next request is served.
        assert client.assign(model_id, [("7.png", digit_png(7))])[0]["filename"] == "7.png"
    finally:
        client.close()
        stop(proc, timeout=60)


def test_an_upload_with_train_and_test_folders_reports_the_test_split(embedded, tmp_path):
    """Through the API: the upload's classes are its class folders (not `train`/`test`), and the job's
    headline metrics come from `test/`, with the training images' figures beside them."""
    import zipfile

    from sklearn.datasets import load_digits

    client, _ = embedded
    d = load_digits()
    path = tmp_path / "split.zip"
    with zipfile.ZipFile(path, "w") as z:
        for i in range(400):
            png = io.BytesIO()
            Image.fromarray((d.images[i] * 255 / 16).astype("uint8")).save(png, format="PNG")
            z.writestr(f"mine/{'test' if i % 4 == 0 else 'train'}/{d.target[i]}/{i:04d}.png", png.getvalue())
    ds = client.upload_dataset(path, "split digits")
    assert ds["classes"] == [str(c) for c in range(10)]
    job = client.submit("pipeline", ds["id"], FAST_PIPELINE)
    final = client.wait(job["id"], timeout=900, poll_s=0.5)
    assert final["status"] == "succeeded", final["error"]
    m = final["metrics"]
    assert m["evaluated_on"] == "test" and m["num_images"] == 100
    assert m["train"]["num_images"] == 300 and 0.0 < m["train"]["acc"] <= 1.0
    names = {a["name"] for a in final["artifacts"]}
    assert {"confusion_matrix.png", "train_confusion_matrix.png", "train_assignments.csv"} <= names


def test_a_job_on_two_processes_through_torchrun(tmp_path):
    """NNM_PROCESSES_PER_JOB=2: the worker starts the job through torchrun; rank 0 reports and uploads,
    the job succeeds once, with its artifacts and a model that assigns. NNM_JOB_THREADS caps the
    threads a job asks for."""
    proc, client = serve(tmp_path, NNM_PROCESSES_PER_JOB="2", NNM_JOB_THREADS="1")
    try:
        client.wait_ready(90)
        ds = client.builtin_dataset("digits")
        job = client.submit("pipeline", ds["id"], {**FAST_PIPELINE, "runtime": {"threads": 3}})
        final = client.wait(job["id"], timeout=900, poll_s=1)
        assert final["status"] == "succeeded", final["error"]
        assert final["attempt"] == 1 and final["metrics"]["processes"] == 2
        assert final["metrics"]["threads"] == 1  # asked for 3, capped by the worker
        assert 0.0 < final["metrics"]["acc"] <= 1.0
        names = {a["name"] for a in final["artifacts"]}
        assert {"metrics.json", "confusion_matrix.png", "model/model.pt"} <= names, names
        results = client.assign(final["model_id"], [("seven.png", digit_png(7))])
        assert 0 <= results[0]["cluster"] < 10
    finally:
        client.close()
        stop(proc, timeout=60)
