"""Lose nothing, do nothing twice: a stage's files before its completion marker, and every write of a
job fenced by its attempt.

The jobs run through the worker's real runner and training child (`execute_job`), against the real
job stores (SQLite, Postgres) and artifact stores (a local directory, SeaweedFS). The one fault that
cannot be caused from outside, "this one upload fails", is injected into the child by
tests/service/faultsite/sitecustomize.py.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from nnm.service.context import ServiceContext
from nnm.service.settings import load_settings
from nnm.service.worker.execution import JobLost, ServiceSink
from nnm.service.worker.runner import execute_job

from .conftest import digits_zip, figure

FAULT_SITE = Path(__file__).parent / "faultsite"

#: About 20 s per attempt on 2 cores: 3 pretext epochs (a checkpoint uploaded after each), no self-labelling.
TINY_PIPELINE = {
    "preset": "quick",
    "runtime": {"device": "cpu", "seed": 2},
    "pretext": {"epochs": 3, "batch_size": 256},
    "cluster": {"epochs": 1},
    "selflabel": {"enabled": False},
}


def point_at(monkeypatch, data_dir: Path, infra: dict | None) -> ServiceContext:
    """Point this process and the job children it starts at one job store and artifact store."""
    for key in [k for k in os.environ if k.startswith("NNM_") and k != "NNM_RELIABILITY_FIGURES"]:
        monkeypatch.delenv(key)
    env = {"NNM_DATA_DIR": str(data_dir), "NNM_DEVICE": "cpu", "NNM_CHECKPOINT_UPLOAD_INTERVAL_S": "0",
           "NNM_HEARTBEAT_TIMEOUT_S": "60", "OMP_NUM_THREADS": "2"}
    if infra is not None:  # Postgres and SeaweedFS instead of SQLite and a directory
        s3 = infra["s3"]
        env |= {"NNM_DATABASE_URL": infra["database_url"], "NNM_S3_ENDPOINT": s3["endpoint"],
                "NNM_S3_ACCESS_KEY": s3["access_key"], "NNM_S3_SECRET_KEY": s3["secret_key"],
                "NNM_S3_BUCKET": s3["bucket"]}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return ServiceContext.from_settings(load_settings(), migrate=True)


def new_job(ctx: ServiceContext, params: dict, job_type: str = "pipeline") -> str:
    """A queued job on 300 digit images uploaded to the artifact store, as the gateway creates one."""
    from nnm.service.store.db import new_id

    dataset_id = new_id("ds")
    key = f"datasets/{dataset_id}/data.zip"
    size = ctx.store.put_bytes(key, digits_zip(300))
    ctx.jobs.add_dataset(id=dataset_id, owner="public", name="digits-300", kind="upload", builtin=None, split=None,
                         key=key, image_count=300, image_size=8, channels=1, classes=[str(i) for i in range(10)],
                         size_bytes=size)
    job, _ = ctx.jobs.create_job(owner="public", type=job_type, dataset_id=dataset_id, inputs={}, params=params,
                                 queue="gpu", max_attempts=3)
    return job.id


@pytest.fixture(params=["local", "s3"])
def stores(request, monkeypatch, tmp_path):
    """(context, kind): SQLite + local directory, or Postgres + SeaweedFS (the session's servers)."""
    infra = None
    if request.param == "s3":
        infra = request.getfixturevalue("infra")
        request.getfixturevalue("migrated")
    ctx = point_at(monkeypatch, tmp_path / "data", infra)
    yield ctx, request.param
    ctx.close()


# ---------------------------------------------------------------------------------------------------
# The completion marker goes up last, and resume checks a stage's files before skipping it.


@pytest.mark.parametrize(("fault", "next_machine"), [("after-marker", "another"), (r"/pretext/model\.pt$", "same")])
def test_an_upload_failing_once_mid_stage_costs_one_retry_not_the_job(monkeypatch, tmp_path, fault, next_machine):
    """One failed upload, right after a stage's marker or in the middle of a stage's files: the next
    attempt, on another worker machine or the same one, must not skip a stage whose files are not all
    in the store; the job succeeds with all its artifacts recorded."""
    ctx = point_at(monkeypatch, tmp_path / "data", None)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in [str(FAULT_SITE), os.environ.get("PYTHONPATH")] if p))
    monkeypatch.setenv("NNM_FAULT_PUT", fault)
    monkeypatch.setenv("NNM_FAULT_FLAG", str(tmp_path / "fault-fired"))
    try:
        job_id = new_job(ctx, TINY_PIPELINE)
        statuses = []
        while (status := execute_job(ctx, job_id)) == "queued" and len(statuses) < 3:
            statuses.append(status)  # handed back for another attempt, as the Celery task does
            if next_machine == "another":  # nothing of the failed attempt is left on the next one's disk
                shutil.rmtree(ctx.settings.work_dir, ignore_errors=True)
        job = ctx.jobs.get_job(job_id)
        assert (tmp_path / "fault-fired").exists(), "the fault was not injected"
        assert status == "succeeded", (statuses, status, job.error)
        assert job.attempt == 2  # the attempt with the failed upload, then one that finished the job
        names = {a.name for a in ctx.jobs.artifacts(job_id)}
        assert {"pretext/model.pt", "pretext/done.json", "mine/neighbors.npy", "metrics.json"} <= names
        figure("one upload fails once mid-stage", fault=fault, next_attempt_on=f"{next_machine} machine",
               status=status, attempts=job.attempt)
    finally:
        ctx.close()


# ---------------------------------------------------------------------------------------------------
# A worker that lost its job (cut off from Postgres, then taken over) cannot change what the job's
# artifacts are.


def _stage_files(directory: Path, payload: bytes) -> Path:
    (directory / "pretext").mkdir(parents=True, exist_ok=True)
    (directory / "pretext" / "model.pt").write_bytes(payload)
    (directory / "pretext" / "done.json").write_text('{"stage": "pretext"}')
    (directory / "metrics.json").write_bytes(b'{"acc": ' + str(len(payload)).encode() + b"}")
    return directory


def _recorded(ctx: ServiceContext, job_id: str) -> dict[str, tuple[str, int, bytes]]:
    """What the job's artifacts point to: name -> (key, size, the object's bytes)."""
    return {a.name: (a.key, a.size, ctx.store.get_bytes(a.key)) for a in ctx.jobs.artifacts(job_id)}


def test_a_stale_attempt_cannot_repoint_or_overwrite_the_current_attempts_artifacts(stores, tmp_path):
    ctx, _ = stores
    job_id = new_job(ctx, TINY_PIPELINE)
    first = ctx.jobs.claim(job_id, "worker-1", heartbeat_timeout_s=60)
    assert first.attempt == 1
    stale = ServiceSink(ctx, first.job, 1, _stage_files(tmp_path / "w1", b"stale weights, longer"), ["pretext"])
    # Worker 1 stops heartbeating (cut off from Postgres); worker 2 takes the job over.
    second = ctx.jobs.claim(job_id, "worker-2", heartbeat_timeout_s=0)
    assert second.attempt == 2
    current = ServiceSink(ctx, second.job, 2, _stage_files(tmp_path / "w2", b"current weights"), ["pretext"])
    (current.out / "cluster").mkdir()
    (current.out / "cluster" / "checkpoint.pt").write_bytes(b"current checkpoint")
    current.epoch_finished("cluster", 1, {})
    current.upload(current.out / "pretext", "pretext")
    current.upload_files([current.out / "metrics.json"])
    before = _recorded(ctx, job_id)
    assert before["pretext/model.pt"][2] == b"current weights"

    # Worker 1 comes back and goes on as if it still owned the job: every write is refused or lands
    # where nobody reads it.
    (stale.out / "cluster").mkdir()
    (stale.out / "cluster" / "checkpoint.pt").write_bytes(b"stale checkpoint")
    stale.epoch_finished("cluster", 1, {})
    with pytest.raises(JobLost):
        stale.upload(stale.out / "pretext", "pretext")
    with pytest.raises(JobLost):
        stale.upload_files([stale.out / "metrics.json"])
    with pytest.raises(JobLost):
        stale.stage_finished("cluster", {})
    assert ctx.jobs.add_artifacts(job_id, [("pretext/model.pt", before["metrics.json"][0], 9)], attempt=1) is False
    assert ctx.jobs.add_model_for_attempt(1, owner="public", job_id=job_id, dataset_id=second.job.dataset_id,
                                          key_prefix="elsewhere", clusters=10, class_names=None, metrics={}) is None

    assert _recorded(ctx, job_id) == before
    # The next attempt resumes from the current attempt's files and checkpoint, not the stale one's.
    from nnm.service.worker.execution import restore_job

    ctx.jobs.claim(job_id, "worker-3", heartbeat_timeout_s=0)
    restore_job(ctx, job_id, 3, tmp_path / "w3")
    assert (tmp_path / "w3" / "pretext" / "model.pt").read_bytes() == b"current weights"
    assert (tmp_path / "w3" / "cluster" / "checkpoint.pt").read_bytes() == b"current checkpoint"
    # All of it is still under the job's prefix: deleting jobs/{id}/ deletes every attempt's objects.
    assert all(key.startswith(f"jobs/{job_id}/") for key, _, _ in before.values())
