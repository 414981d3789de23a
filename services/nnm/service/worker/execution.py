"""What runs inside a job's child process: the engine, with progress and artifacts going to the
job store and the artifact store.

Outputs are uploaded as each stage finishes, and a running stage's checkpoint every
`checkpoint_upload_interval_s`, so another worker can resume the job where this one stopped.

Every attempt writes under its own prefix, `jobs/{id}/a{attempt}/`, and records what it wrote as
artifact rows only while it still owns the job (`JobStore.add_artifacts` checks the attempt). A
worker cut off from Postgres that keeps training after its job was taken over therefore writes
objects nobody reads: the rows, which resume and the API follow, point at the current attempt's.
A stage's completion marker is uploaded after its files and checked against them on resume.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.exc import DBAPIError

from api_schemas import JobStatus
from nnm.engine.config import PipelineConfig
from nnm.engine.data import LoadLimits, load_dataset
from nnm.engine.distributed import from_env
from nnm.engine.errors import NNMError
from nnm.engine.export import export_model
from nnm.engine.model_io import TrainedModel
from nnm.engine.pipeline import run_pipeline
from nnm.engine.progress import ProgressEvent, ProgressSink
from nnm.engine.stages import run_cluster, run_evaluate, run_mine, run_pretext, run_selflabel

from ..context import ServiceContext
from ..jobspec import (
    BACKBONE_PREFIX,
    INPUT_STAGE,
    backbone_key,
    dataset_spec,
    resolve,
    stages_of,
    uploaded_backbone,
)
from ..retry import is_transient, retry_db
from ..store.db import JobRow, utcnow
from ..store.storage import download_items, download_prefix, upload_dir
from .child import attempt_dir
from .metrics import enabled as metrics_enabled
from .metrics import worker_metrics

log = logging.getLogger("nnm.worker")

HEADLINE_METRICS = ("acc", "nmi", "ari", "top5", "num_images", "num_clusters", "empty_clusters", "mean_confidence")


def job_prefix(job_id: str) -> str:
    """Every object of a job is under this prefix (deleting a job deletes it)."""
    return f"jobs/{job_id}"


def attempt_prefix(job_id: str, attempt: int) -> str:
    """Where one attempt of a job writes; no other attempt writes there."""
    return f"{job_prefix(job_id)}/a{attempt}"


#: Stage directories of a job's outputs: artifact names `{stage}/...`.
STAGE_DIRS = ("pretext", "mine", "estimate", "cluster", "selflabel")
#: `jobs/{id}/a{attempt}/{stage}/checkpoint.pt`, or `jobs/{id}/{stage}/checkpoint.pt` from before attempts
#: had prefixes (attempt 0).
_CHECKPOINT_KEY = re.compile(r"^jobs/[^/]+/(?:a(\d+)/)?([a-z]+)/checkpoint\.pt$")
_ATTEMPT_KEY = re.compile(r"^jobs/[^/]+/a(\d+)/")


def key_attempt(key: str) -> int:
    """The attempt that wrote an object of a job (0 for keys from before attempt prefixes)."""
    m = _ATTEMPT_KEY.match(key)
    return int(m.group(1)) if m else 0


def restore_stages(ctx: ServiceContext, job_id: str, stages: tuple[str, ...], out: Path) -> tuple[set[str], int]:
    """Download the finished `stages` of a job into `out/{stage}` from what its artifact rows record.

    Returns (the stages found finished, the newest attempt that wrote any of their files). A stage
    counts as finished when its completion marker is recorded: a stage's rows are written in one
    transaction, after all its files were uploaded.
    """
    rows = [a for a in ctx.jobs.artifacts(job_id) if "/" in a.name and a.name.split("/", 1)[0] in stages]
    finished = {a.name.split("/", 1)[0] for a in rows if a.name.count("/") == 1 and a.name.endswith("/done.json")}
    items = [(a.name, a.key, a.size) for a in rows if a.name.split("/", 1)[0] in finished]
    download_items(ctx.store, items, out)
    return finished, max((key_attempt(key) for _, key, _ in items), default=0)


def restore_job(ctx: ServiceContext, job_id: str, attempt: int, out: Path) -> None:
    """Resume state for `attempt`: the job's finished stages, and the newest checkpoint of each other stage.

    A checkpoint is taken only from an attempt no older than the finished stages' files: an older
    one may have been trained on outputs that are no longer the recorded ones.
    """
    finished, floor = restore_stages(ctx, job_id, STAGE_DIRS, out)
    newest: dict[str, tuple[int, str]] = {}
    for key in ctx.store.list(f"{job_prefix(job_id)}/"):
        m = _CHECKPOINT_KEY.match(key)
        if m is None or m.group(2) in finished:
            continue
        written_by = int(m.group(1) or 0)
        if floor <= written_by < attempt and written_by > newest.get(m.group(2), (-1, ""))[0]:
            newest[m.group(2)] = (written_by, key)
    for stage, (_, key) in newest.items():
        ctx.store.get_file(key, out / stage / "checkpoint.pt")


class JobLost(Exception):
    """This attempt no longer owns the job (another worker took it over)."""


class ServiceSink(ProgressSink):
    """Progress into the job store (at most once a second), cancellation from it, uploads to S3."""

    def __init__(self, ctx: ServiceContext, job: JobRow, attempt: int, out: Path, stages: list[str]):
        self.ctx, self.job_id, self.attempt, self.out = ctx, job.id, attempt, out
        self.stage: str | None = None
        self.stage_t0: float | None = None
        self.parent = os.getppid()
        self.status = JobStatus.running.value
        self.last_write = 0.0
        self.last_progress: dict[str, Any] = {}
        self.last_upload = time.monotonic()
        previous = {s["name"]: s for s in (job.stages or [])}
        self.stages = [previous.get(name, {"name": name, "status": "pending"}) for name in stages]

    def _write(self, progress: dict[str, Any]) -> None:
        self.last_write = time.monotonic()
        self.last_progress = progress
        try:
            status = self.ctx.jobs.update_progress(self.job_id, self.attempt, progress, self.stage)
        except DBAPIError as exc:
            if not is_transient(exc):
                raise
            log.warning("progress not recorded: database unreachable; training goes on")
            return
        if status is None:
            raise JobLost()
        self.status = status

    def _set_stage(self, name: str, status: str) -> None:
        now = utcnow().isoformat()
        for s in self.stages:
            if s["name"] == name and s["status"] != "succeeded":
                s["status"] = status
                s["started_at" if status == "running" else "finished_at"] = now
        retry_db(lambda: self.ctx.jobs.set_stages(self.job_id, self.attempt, self.stages), "record stages")

    def stage_started(self, stage: str, epochs: int, steps: int) -> None:
        self.stage = stage
        self.stage_t0 = time.monotonic()
        self._set_stage(stage, "running")
        self._write({"stage": stage, "epoch": 0, "epochs": epochs, "step": 0, "steps": steps, "fraction": 0.0})

    def update(self, event: ProgressEvent) -> None:
        self.last_progress = event.as_dict()
        if event.images_per_s and metrics_enabled():
            worker_metrics().images_per_second.labels(event.stage).set(event.images_per_s)
        if time.monotonic() - self.last_write >= 1.0:
            self._write(self.last_progress)

    def epoch_finished(self, stage: str, epoch: int, stats: dict[str, float]) -> None:
        interval = self.ctx.settings.checkpoint_upload_interval_s
        if time.monotonic() - self.last_upload >= interval:
            ckpt = self.out / stage / "checkpoint.pt"
            if ckpt.exists():
                self.ctx.store.put_file(f"{attempt_prefix(self.job_id, self.attempt)}/{stage}/checkpoint.pt", ckpt)
            self.last_upload = time.monotonic()

    def stage_finished(self, stage: str, summary: dict[str, Any]) -> None:
        if metrics_enabled() and self.stage_t0 is not None and stage == self.stage:
            worker_metrics().stage_seconds.labels(stage).observe(time.monotonic() - self.stage_t0)
        directory = self.out / stage
        if directory.is_dir():
            self.upload(directory, f"{stage}")
            self._drop_checkpoints(stage)
        self._set_stage(stage, "succeeded")

    def _drop_checkpoints(self, stage: str) -> None:
        """Delete the finished stage's checkpoints: this attempt's and older ones, never a newer attempt's."""
        for key in self.ctx.store.list(f"{job_prefix(self.job_id)}/"):
            m = _CHECKPOINT_KEY.match(key)
            if m is not None and m.group(2) == stage and int(m.group(1) or 0) <= self.attempt:
                self.ctx.store.delete_prefix(key)

    def _record(self, rows: list[tuple[str, str, int]], replace_prefix: str | None = None) -> None:
        """Record artifacts, or stop with JobLost when this attempt no longer owns the job."""
        if not retry_db(lambda: self.ctx.jobs.add_artifacts(self.job_id, rows, attempt=self.attempt,
                                                            replace_prefix=replace_prefix), "record artifacts"):
            raise JobLost()

    def upload(self, directory: Path, name_prefix: str) -> None:
        """Upload a directory under this attempt's prefix (marker last) and record it as `name_prefix/...`.

        The directory's rows replace all earlier rows under `name_prefix/`, so a stage's recorded files
        always come from one attempt.
        """
        prefix = f"{attempt_prefix(self.job_id, self.attempt)}/{name_prefix}".rstrip("/")
        items = upload_dir(self.ctx.store, directory, prefix, skip=("checkpoint.pt",))
        base = f"{name_prefix}/" if name_prefix else ""
        rows = [(f"{base}{rel}", f"{prefix}/{rel}", size) for rel, size in items]
        self._record(rows, replace_prefix=base or None)

    def message(self, text: str) -> None:
        log.info("%s", text)
        try:
            self.ctx.jobs.event(self.job_id, "message", {"attempt": self.attempt, "text": text})
        except DBAPIError as exc:
            if not is_transient(exc):
                raise

    def upload_files(self, paths: list[Path]) -> None:
        prefix = attempt_prefix(self.job_id, self.attempt)
        items = [(p.name, f"{prefix}/{p.name}", self.ctx.store.put_file(f"{prefix}/{p.name}", p)) for p in paths]
        self._record(items)

    def should_stop(self) -> bool:
        if os.getppid() != self.parent:  # the worker died (no PDEATHSIG here): stop, nobody waits for us
            raise JobLost()
        if time.monotonic() - self.last_write >= 1.0:  # heartbeat: re-send the latest progress, not a blank one
            self._write(self.last_progress)
        return self.status == JobStatus.cancelling.value


def _materialize_dataset(ctx: ServiceContext, dataset: Any, workdir: Path, fetch: bool = True) -> str:
    """The dataset's spec for the engine: a built-in's name, or the local copy of the upload (downloaded
    unless `fetch` is False: a rank other than 0, which reads rank 0's copy)."""
    if dataset.kind == "builtin":
        return dataset_spec(dataset)
    local = workdir / "dataset.zip"
    if fetch and not local.exists():
        ctx.store.get_file(dataset.key, local)
    return str(local)


def _limits(ctx: ServiceContext) -> LoadLimits:
    s = ctx.settings
    return LoadLimits(
        max_files=s.max_images,
        max_total_bytes=s.max_uncompressed_bytes,
        max_image_pixels=s.max_image_pixels,
        max_member_bytes=s.max_member_bytes,
        max_total_pixels=s.max_upload_pixels,
    )


def run_job_stages(ctx: ServiceContext, job: JobRow, attempt: int, workdir: Path) -> dict[str, Any]:
    """Run the job's stages in `workdir`; returns {"metrics", "model_id"}. Raises NNMError for bad input."""
    dataset = ctx.jobs.get_dataset(job.dataset_id)
    if dataset is None:
        raise NNMError(f"dataset {job.dataset_id} no longer exists")
    # This attempt's own directory (the dataset and backbone stay in `workdir`, shared by attempts):
    # resume from the finished stages as recorded and the newest usable checkpoint, never from what
    # another attempt left on this machine.
    out = attempt_dir(workdir, attempt) / "out"
    out.mkdir(parents=True, exist_ok=True)
    # A job on several processes (worker/launch.py): rank 0 fetches, reports and uploads; the others
    # wait for its files, then train beside it with a silent sink.
    ranks = from_env()
    if ranks.main:
        restore_job(ctx, job.id, attempt, out)
    spec = _materialize_dataset(ctx, dataset, workdir, fetch=ranks.main)
    params = job.params
    init = (params.get("pretext") or {}).get("init") if isinstance(params.get("pretext"), dict) else None
    if isinstance(init, str) and init.startswith(BACKBONE_PREFIX):  # an uploaded backbone: fetch it
        local = workdir / "backbone.pt"
        if not local.exists() and ranks.main:  # checked again here: the id is an id, and only the owner's is reachable
            ctx.store.get_file(backbone_key(job.owner, uploaded_backbone(init) or ""), local)
        params = {**params, "pretext": {**params["pretext"], "init": str(local)}}
    inputs = job.inputs or {}
    if ranks.main:
        for name, stage in INPUT_STAGE.items():
            if inputs.get(name) and not (out / stage / "done.json").exists():
                restore_stages(ctx, inputs[name], (stage,), out)
    ranks.barrier()
    cfg: PipelineConfig = resolve(dataset, params, ctx.settings.device, spec=spec)
    cap = ctx.settings.job_threads
    if cap is not None:  # the worker's share of the machine's cores; a job may ask for fewer
        cfg.runtime.threads = min(cfg.runtime.threads or cap, cap)
    stages = stages_of(job.type, cfg)
    sink: ProgressSink = ServiceSink(ctx, job, attempt, out, stages) if ranks.main else ProgressSink()
    rt = cfg.runtime
    d = cfg.data

    def data_for(split: str | None = None):
        return load_dataset(spec, split, d.image_size, d.root, limits=_limits(ctx), cache=d.cache_policy())

    if job.type == "pipeline":
        metrics = run_pipeline(cfg, out, sink)
        sink.stage_finished("evaluate", metrics)
    elif job.type == "pretext":
        run_pretext(cfg.pretext, data_for(d.pretext_split), out / "pretext", rt, sink)
        metrics = None
    elif job.type == "mine":
        summary = run_mine(cfg.mine, data_for(), out / "pretext", out / "mine", rt, sink)
        metrics = {"neighbor_accuracy": summary.get("neighbor_accuracy")}
    elif job.type in {"cluster", "selflabel"}:
        data = data_for()
        if job.type == "cluster":
            run_cluster(cfg.cluster, data, out / "pretext", out / "mine", out / "cluster", rt, sink)
        else:
            run_selflabel(cfg.selflabel, data, out / "cluster", out / "selflabel", rt, sink)
        if not ranks.main:
            return {"metrics": None, "model_id": None}
        sink.stage_started("evaluate", 1, 1)
        trained = export_model(out / job.type, data, out / "model")
        mined = out / "mine" / "neighbors.npy"
        metrics = run_evaluate(trained, data, out, cfg.evaluate, rt,
                               gallery_neighbors=np.load(mined) if mined.exists() else None)
        sink.stage_finished("evaluate", metrics)
    elif not ranks.main:  # evaluate: nothing to train
        return {"metrics": None, "model_id": None}
    else:  # evaluate
        model_row = ctx.jobs.get_model(inputs["model_id"])
        model_dir = attempt_dir(workdir, attempt) / "input-model"
        download_prefix(ctx.store, model_row.key_prefix, model_dir)
        sink.stage_started("evaluate", 1, 1)
        metrics = run_evaluate(TrainedModel.load(model_dir), data_for(), out, cfg.evaluate, rt)
        sink.stage_finished("evaluate", metrics)

    if not ranks.main:
        return {"metrics": None, "model_id": None}
    assert isinstance(sink, ServiceSink)
    # Final files: metrics, pictures, assignments (top level of `out`) and the model.
    sink.upload_files([p for p in sorted(out.iterdir()) if p.is_file() and not p.name.startswith(".")])
    if (out / "gallery" / "clusters.json").exists():
        sink.upload(out / "gallery", "gallery")
    if (out / "model").is_dir():
        sink.upload(out / "model", "model")
    model_id = None
    if (out / "model" / "model.json").exists() and job.type != "evaluate":
        info = json.loads((out / "model" / "model.json").read_text())
        row = ctx.jobs.add_model_for_attempt(
            attempt,
            owner=job.owner,
            job_id=job.id,
            dataset_id=job.dataset_id,
            key_prefix=f"{attempt_prefix(job.id, attempt)}/model",  # where `sink.upload` just put it
            clusters=info["clusters"],
            class_names=info.get("class_names"),
            metrics={k: metrics[k] for k in HEADLINE_METRICS if metrics and k in metrics},
        )
        if row is None:
            raise JobLost()
        model_id = row.id
    return {"metrics": _jsonable_metrics(metrics), "model_id": model_id}


def _jsonable_metrics(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    if metrics is None:
        return None
    keep = {k: v for k, v in metrics.items() if k not in {"cluster_to_class", "confusion_matrix"}}
    return json.loads(json.dumps(keep, default=str))
