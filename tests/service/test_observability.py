"""Observability against a real gateway and Celery worker (their own database and broker): the worker's
Prometheus metrics after jobs that succeed and are cancelled, JSON logs carrying job and request ids,
and the Grafana dashboard naming only series that exist."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest
from nnm.service.client import Client
from nnm.service.store.migrations import upgrade
from prometheus_client.parser import text_string_to_metric_families

from .servers import REPO, free_port, postgres_database, redis_database, start_gateway, start_worker, stop

pytestmark = pytest.mark.slow

DASHBOARD = REPO / "deploy" / "grafana" / "nnm-dashboard.json"
SHORT = {"preset": "quick", "pretext": {"epochs": 2}, "cluster": {"epochs": 1}, "selflabel": {"epochs": 1}}


@pytest.fixture(scope="module")
def stack(service_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("observability")
    with postgres_database() as url, redis_database() as broker:
        upgrade(url)
        port = free_port()
        env = {**service_env, "NNM_DATABASE_URL": url, "NNM_BROKER_URL": broker, "NNM_DATA_DIR": str(root / "data"),
               "NNM_LOG_FORMAT": "json", "NNM_WORKER_METRICS_PORT": str(port)}
        gateway, base = start_gateway(env, root / "gateway.log")
        worker = start_worker(env, root / "worker.log", name="obs")
        client = Client(base, timeout=120)
        try:
            yield {"base": base, "metrics": f"http://127.0.0.1:{port}/metrics", "client": client, "root": root}
        finally:
            client.close()
            stop(worker, timeout=60)
            stop(gateway)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a Prometheus text page: {(name, sorted labels): value}."""
    text = httpx.get(url, timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture(scope="module")
def finished(stack) -> dict:
    """One short pipeline, submitted with a request id of the client's choosing, run to success."""
    client = stack["client"]
    dataset = client.builtin_dataset("digits")
    r = client.http.post("/v1/jobs", json={"type": "pipeline", "dataset_id": dataset["id"], "params": SHORT},
                         headers={"X-Request-ID": "req-observability-1"})
    assert r.status_code == 202, r.text
    assert r.headers["x-request-id"] == "req-observability-1"
    job = client.wait(r.json()["id"], timeout=600)
    assert job["status"] == "succeeded", job
    return {"job": job, "dataset": dataset}


def test_worker_counts_a_finished_job(stack, finished):
    job = finished["job"]
    m = scrape(stack["metrics"])
    assert value(m, "nnm_worker_jobs_started_total", queue="gpu", type="pipeline") == 1
    assert value(m, "nnm_worker_jobs_finished_total", queue="gpu", type="pipeline", outcome="succeeded") == 1
    assert value(m, "nnm_worker_job_attempt_bucket", queue="gpu", le="1.0") == 1
    assert value(m, "nnm_worker_job_seconds_count", type="pipeline", outcome="succeeded") == 1
    wall = value(m, "nnm_worker_job_seconds_sum", type="pipeline", outcome="succeeded")
    trained = [s["name"] for s in job["stages"] if s["name"] in {"pretext", "mine", "cluster", "selflabel"}]
    assert {"pretext", "cluster", "selflabel"} <= set(trained)
    stage_total = 0.0
    for stage in trained:
        assert value(m, "nnm_worker_stage_seconds_count", stage=stage) == 1, stage
        stage_total += value(m, "nnm_worker_stage_seconds_sum", stage=stage)
    assert 0 < stage_total < wall  # the stages run inside the attempt
    assert value(m, "nnm_worker_images_per_second", stage="pretext") > 0
    for status in ("queued", "running", "cancelling"):
        assert value(m, "nnm_queue_jobs", queue="gpu", status=status) == 0


def test_queue_depth_and_a_cancelled_job(stack, finished):
    client = stack["client"]
    long = {**SHORT, "pretext": {"epochs": 500}}
    job = client.submit("pipeline", finished["dataset"]["id"], long)
    deadline = time.monotonic() + 120
    while client.job(job["id"])["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    m = scrape(stack["metrics"])
    assert value(m, "nnm_queue_jobs", queue="gpu", status="running") == 1
    assert value(m, "nnm_worker_jobs_started_total", queue="gpu", type="pipeline") == 2
    client.cancel(job["id"])
    assert client.wait(job["id"], timeout=180, poll_s=0.5)["status"] == "cancelled"
    deadline = time.monotonic() + 30  # the pool process counts the outcome just after recording it
    while time.monotonic() < deadline:
        m = scrape(stack["metrics"])
        if value(m, "nnm_worker_jobs_finished_total", queue="gpu", type="pipeline", outcome="cancelled"):
            break
        time.sleep(0.5)
    assert value(m, "nnm_worker_jobs_finished_total", queue="gpu", type="pipeline", outcome="cancelled") == 1
    assert value(m, "nnm_worker_jobs_finished_total", queue="gpu", type="pipeline", outcome="succeeded") == 1
    assert value(m, "nnm_queue_jobs", queue="gpu", status="running") == 0


def json_lines(path: Path) -> list[dict]:
    """The log records of a process's output: every line that is not a banner printed to stdout (uvicorn's
    and Celery's startup text, Celery's 'Warm shutdown') is one JSON object."""
    records = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
        else:
            assert not re.match(r"^\d{4}-\d\d-\d\d[ T]", line), f"a text log record: {line}"
    assert records
    return records


def test_logs_are_json_with_job_and_request_ids(stack, finished):
    job_id = finished["job"]["id"]
    gateway = json_lines(stack["root"] / "gateway.log")
    submitted = [r for r in gateway if r.get("job_id") == job_id and "submitted" in r["message"]]
    assert submitted and submitted[0]["request_id"] == "req-observability-1"
    assert submitted[0]["level"] == "INFO" and submitted[0]["process"] == "gateway"
    worker = json_lines(stack["root"] / "worker.log")
    mine = [r for r in worker if r.get("job_id") == job_id]
    assert any("starting" in r["message"] for r in mine), [r["message"] for r in worker][-20:]
    assert all({"time", "level", "logger", "message"} <= set(r) for r in gateway + worker)
    # A hostile request id is replaced, not echoed or logged.
    r = stack["client"].http.get("/v1/jobs", headers={"X-Request-ID": "x" * 500})
    assert r.status_code == 200 and re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


def test_dashboard_names_only_series_that_exist(stack, finished):
    """Every nnm_* series in the Grafana dashboard is one the worker or the gateway exports."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\bnnm_[a-z_]+", e)}
    exported = {name for name, _ in scrape(stack["metrics"])} | {name for name, _ in scrape(f"{stack['base']}/metrics")}
    assert used and used <= exported, used - exported
    assert {"nnm_worker_jobs_finished_total", "nnm_worker_stage_seconds_bucket", "nnm_queue_jobs",
            "nnm_worker_images_per_second"} <= used
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"])
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
