"""`nnm remote`: the CLI driving the real stack (gateway, Celery worker, Postgres, Redis, SeaweedFS) as a
user's laptop would, in subprocesses, with the exit statuses a script relies on."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from nnm.service.client import Client

from .conftest import digits_zip

pytestmark = pytest.mark.slow

SHORT = ["--preset", "quick", "--set", "pretext.epochs=2", "--set", "cluster.epochs=1", "--set", "selflabel.epochs=1"]


def nnm(url: str, *argv: str, key: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNM_")}
    env.update(NNM_URL=url, OMP_NUM_THREADS="1", **({"NNM_API_KEY": key} if key else {}))
    return subprocess.run([sys.executable, "-m", "nnm.cli.main", "remote", *argv], env=env, capture_output=True,
                          text=True, timeout=timeout)


def lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("remote")
    zipfile.ZipFile(io.BytesIO(digits_zip(200))).extractall(root)
    (root / "digits" / ".DS_Store").write_bytes(b"not an image")  # hidden files are left out of the upload
    return root / "digits"


@pytest.fixture(scope="module")
def finished(gateway_url, worker, folder) -> dict:
    """A folder uploaded and a short pipeline submitted and watched to its end, all through `nnm remote`."""
    up = nnm(gateway_url, "upload", str(folder), "--name", "remote-digits")
    assert up.returncode == 0, up.stderr
    dataset = json.loads(up.stdout)
    run = nnm(gateway_url, "submit", "--dataset", dataset["id"], *SHORT, "--seed", "3", "--watch")
    assert run.returncode == 0, run.stderr
    return {"dataset": dataset, "job": json.loads(run.stdout), "stderr": run.stderr}


def test_upload_keeps_class_folders(finished):
    dataset = finished["dataset"]
    assert dataset["name"] == "remote-digits"
    assert dataset["image_count"] == 200 and dataset["classes"] == [str(d) for d in range(10)]


def test_submit_watch_reports_the_outcome(finished, gateway_url):
    job = finished["job"]
    assert job["status"] == "succeeded" and job["model_id"]
    assert job["params"]["preset"] == "quick" and job["config"]["pretext"]["epochs"] == 2
    assert job["config"]["runtime"]["seed"] == 3
    assert "100%" in finished["stderr"]  # the progress bar reached the end
    listed = nnm(gateway_url, "jobs", "--status", "succeeded", "--limit", "200")
    assert listed.returncode == 0 and job["id"] in {j["id"] for j in lines(listed.stdout)}


def test_download_writes_every_artifact(finished, gateway_url, tmp_path):
    job = finished["job"]
    out = tmp_path / "artifacts"
    r = nnm(gateway_url, "download", job["id"], "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    names = sorted(a["name"] for a in job["artifacts"])
    assert sorted(item["name"] for item in lines(r.stdout)) == names
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == names
    client = Client(gateway_url)
    try:
        big = max(job["artifacts"], key=lambda a: a["size"])
        assert big["size"] > 1_000_000  # over NNM_STREAM_LIMIT_BYTES: served by a redirect to S3
        for name in ("metrics.json", big["name"]):
            assert (out / name).read_bytes() == client.artifact(job["id"], name)
    finally:
        client.close()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["acc"] == job["metrics"]["acc"]
    missing = nnm(gateway_url, "download", job["id"], "--out", str(out), "--only", "nope.bin")
    assert missing.returncode == 2 and "nope.bin" in missing.stderr


def test_assign_prints_one_line_per_image(finished, gateway_url, folder):
    images = sorted(folder.rglob("*.png"))[:5]
    r = nnm(gateway_url, "assign", finished["job"]["model_id"], *map(str, images))
    assert r.returncode == 0, r.stderr
    got = lines(r.stdout)
    assert [g["path"] for g in got] == [str(p) for p in images]
    client = Client(gateway_url)
    try:
        direct = client.assign(finished["job"]["model_id"], [(p.name, p.read_bytes()) for p in images])
    finally:
        client.close()
    assert [g["cluster"] for g in got] == [d["cluster"] for d in direct]
    assert all(0 <= g["cluster"] < 10 and 0 < g["confidence"] <= 1 for g in got)


def test_cancel_and_watch_exit_with_the_outcome(gateway_url, worker, finished):
    submitted = nnm(gateway_url, "submit", "--dataset", finished["dataset"]["id"], "--preset", "quick",
                    "--set", "pretext.epochs=200")
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["id"]
    cancel = nnm(gateway_url, "cancel", job_id)
    assert cancel.returncode == 0 and json.loads(cancel.stdout)["status"] in {"cancelling", "cancelled"}
    watched = nnm(gateway_url, "watch", job_id, "--quiet", "--poll", "0.5", timeout=180)
    assert watched.returncode == 4, watched.stderr
    assert json.loads(watched.stdout)["status"] == "cancelled"
    again = nnm(gateway_url, "cancel", job_id)
    assert again.returncode == 2 and "already ended" in again.stderr


def test_errors_are_one_sentence_and_status_2(gateway_url, tmp_path):
    r = nnm("http://127.0.0.1:9", "jobs")
    assert r.returncode == 2 and "cannot reach the service" in r.stderr and "Traceback" not in r.stderr
    r = nnm(gateway_url, "job", "job_does_not_exist")
    assert r.returncode == 2 and "404" in r.stderr
    (tmp_path / "empty").mkdir()
    r = nnm(gateway_url, "upload", str(tmp_path / "empty"))
    assert r.returncode == 2 and "no files" in r.stderr
    (tmp_path / "notes.txt").write_text("hello")
    r = nnm(gateway_url, "upload", str(tmp_path / "notes.txt"))
    assert r.returncode == 2 and "neither a folder nor a .zip" in r.stderr
    r = nnm(gateway_url, "submit", "--dataset", "ds_nope", "--preset", "quick")
    assert r.returncode == 2 and "ds_nope" in r.stderr
    # The admin API is closed to anonymous callers even where the rest of the service is open.
    r = nnm(gateway_url, "keys", "list")
    assert r.returncode == 2 and "401" in r.stderr and "admin" in r.stderr
