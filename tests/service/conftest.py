"""Fixtures of the service tests: real Postgres, Redis, SeaweedFS, Celery worker and gateway processes."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from nnm.service.client import Client
from PIL import Image

from .servers import postgres_database, redis_database, seaweedfs, start_gateway, start_worker, stop

#: A pipeline of about half a minute on 2 cores: long enough to watch its progress move.
FAST_PIPELINE = {
    "preset": "quick",
    "pretext": {"epochs": 10, "batch_size": 64},
    "cluster": {"epochs": 2},
    "selflabel": {"epochs": 1},
}


def digits_zip(count: int = 300) -> bytes:
    """The first `count` scikit-learn digits as PNG files in class folders, zipped."""
    from sklearn.datasets import load_digits

    d = load_digits()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(count):
            png = io.BytesIO()
            Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).save(png, format="PNG")
            z.writestr(f"digits/{d.target[i]}/{i:04d}.png", png.getvalue())
    return buf.getvalue()


def digit_png(i: int) -> bytes:
    from sklearn.datasets import load_digits

    png = io.BytesIO()
    Image.fromarray((load_digits().images[i] * 255 / 16).astype(np.uint8)).save(png, format="PNG")
    return png.getvalue()


@pytest.fixture(scope="session")
def infra(tmp_path_factory):
    """Postgres database, Redis database and an S3 server for this test session."""
    root = tmp_path_factory.mktemp("infra")
    with postgres_database() as pg, redis_database() as broker, seaweedfs(root / "s3") as s3:
        yield {"database_url": pg, "broker_url": broker, "s3": s3, "root": root}


@pytest.fixture(scope="session")
def service_env(infra) -> dict[str, str]:
    """The environment docker-compose gives the gateway and the workers, pointed at the test servers."""
    s3 = infra["s3"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNM_")}
    env.update(
        {
            "NNM_DATABASE_URL": infra["database_url"],
            "NNM_BROKER_URL": infra["broker_url"],
            "NNM_S3_ENDPOINT": s3["endpoint"],
            "NNM_S3_ACCESS_KEY": s3["access_key"],
            "NNM_S3_SECRET_KEY": s3["secret_key"],
            "NNM_S3_BUCKET": s3["bucket"],
            "NNM_DATA_DIR": str(infra["root"] / "data"),
            "NNM_DEVICE": "cpu",
            "NNM_HEARTBEAT_TIMEOUT_S": "20",
            "NNM_CHECKPOINT_UPLOAD_INTERVAL_S": "0",
            "NNM_STREAM_LIMIT_BYTES": "1000000",
            "NNM_CANCEL_GRACE_S": "5",
            "OMP_NUM_THREADS": "2",
            # Small limits, so the bad-input tests can exceed them cheaply.
            "NNM_MAX_UPLOAD_BYTES": "20000000",
            "NNM_MAX_UNCOMPRESSED_BYTES": "50000000",
            "NNM_MAX_IMAGES": "1000",
            "NNM_MAX_IMAGE_PIXELS": "4000000",
            # Short-lived presigned URLs, so a test can watch one expire.
            "NNM_PRESIGN_EXPIRY_S": "4",
        }
    )
    return env


@pytest.fixture(scope="session")
def migrated(service_env, infra):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "nnm.cli.main", "migrate"], env=service_env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    return True


@pytest.fixture(scope="session")
def worker(service_env, migrated, infra):
    proc = start_worker(service_env, infra["root"] / "worker.log")
    yield proc
    stop(proc, timeout=60)


@pytest.fixture(scope="session")
def gateway_url(service_env, migrated, infra):
    proc, base = start_gateway(service_env, infra["root"] / "gateway.log")
    yield base
    stop(proc)


@pytest.fixture()
def client(gateway_url) -> Client:
    c = Client(gateway_url, timeout=120)
    yield c
    c.close()


@pytest.fixture(scope="session")
def uploaded_digits(gateway_url, tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("upload") / "digits.zip"
    path.write_bytes(digits_zip())
    c = Client(gateway_url, timeout=120)
    try:
        return c.upload_dataset(path, name="digits-300")
    finally:
        c.close()


def figure(name: str, **values) -> None:
    """Append a measured figure (for docs/reliability.md) to $NNM_RELIABILITY_FIGURES."""
    path = Path(os.environ.get("NNM_RELIABILITY_FIGURES", "/tmp/nnm-reliability.jsonl"))
    with path.open("a") as f:
        f.write(json.dumps({"test": name, **values}) + "\n")


def child_processes_of(job_id: str) -> list[int]:
    """PIDs of the job's live training processes: a child started fresh names the job on its command
    line; one forked by the worker's fork server (worker/forkserver.py) keeps the server's command
    line and writes its output into the job's `child.log`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            status = (entry / "stat").read_text().split()[2]
            output = os.readlink(entry / "fd" / "1") if b"nnm.service.worker.forkserver" in cmdline else ""
        except OSError:
            continue
        if status == "Z":
            continue
        fresh = job_id.encode() in cmdline and b"nnm.service.worker.child" in cmdline
        if fresh or output.endswith(f"/{job_id}/child.log"):
            pids.append(int(entry.name))
    return pids
