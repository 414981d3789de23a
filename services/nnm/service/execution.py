"""What runs inside a job's child process: the engine, with progress and artifacts going to the
job store and the artifact store.

Outputs are uploaded as each stage finishes, and a running stage's checkpoint every
`checkpoint_upload_interval_s`, so another worker can resume the job where this one stopped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError

from api_schemas import JobStatus
from nnm.engine.config import PipelineConfig
from nnm.engine.data import LoadLimits, load_dataset
from nnm.engine.errors import NNMError
from nnm.engine.export import export_model
from nnm.engine.model_io import TrainedModel
from nnm.engine.pipeline import run_pipeline
from nnm.engine.progress import ProgressEvent, ProgressSink
from nnm.engine.stages import run_cluster, run_evaluate, run_mine, run_pretext, run_selflabel

from .context import ServiceContext
from .db import JobRow, utcnow
from .jobspec import BACKBONE_PREFIX, INPUT_STAGE, STAGES, dataset_spec, resolve
from .retry import is_transient, retry_db
from .storage import download_prefix, upload_dir

log = logging.getLogger("nnm.worker")

HEADLINE_METRICS = ("acc", "nmi", "ari", "top5", "num_images", "num_clusters", "empty_clusters", "mean_confidence")


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}"


class JobLost(Exception):
    """This attempt no longer owns the job (another worker took it over)."""


class ServiceSink(ProgressSink):
    """Progress into the job store (at most once a second), cancellation from it, uploads to S3."""

    def __init__(self, ctx: ServiceContext, job: JobRow, attempt: int, out: Path, stages: list[str]):
        self.ctx, self.job_id, self.attempt, self.out = ctx, job.id, attempt, out
        self.stage: str | None = None
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
        self._set_stage(stage, "running")
        self._write({"stage": stage, "epoch": 0, "epochs": epochs, "step": 0, "steps": steps, "fraction": 0.0})

    def update(self, event: ProgressEvent) -> None:
        self.last_progress = event.as_dict()
        if time.monotonic() - self.last_write >= 1.0:
            self._write(self.last_progress)

    def epoch_finished(self, stage: str, epoch: int, stats: dict[str, float]) -> None:
        interval = self.ctx.settings.checkpoint_upload_interval_s
        if time.monotonic() - self.last_upload >= interval:
            ckpt = self.out / stage / "checkpoint.pt"
            if ckpt.exists():
                self.ctx.store.put_file(f"{job_prefix(self.job_id)}/{stage}/checkpoint.pt", ckpt)
            self.last_upload = time.monotonic()

    def stage_finished(self, stage: str, summary: dict[str, Any]) -> None:
        directory = self.out / stage
        if directory.is_dir():
            self.upload(directory, f"{stage}")
            self.ctx.store.delete_prefix(f"{job_prefix(self.job_id)}/{stage}/checkpoint.pt")
        self._set_stage(stage, "succeeded")

    def upload(self, directory: Path, name_prefix: str) -> None:
        prefix = f"{job_prefix(self.job_id)}/{name_prefix}".rstrip("/")
        items = upload_dir(self.ctx.store, directory, prefix, skip=("checkpoint.pt",))
        base = f"{name_prefix}/" if name_prefix else ""
        rows = [(f"{base}{rel}", f"{prefix}/{rel}", size) for rel, size in items]
        retry_db(lambda: self.ctx.jobs.add_artifacts(self.job_id, rows), "record artifacts")

    def message(self, text: str) -> None:
        log.info("%s", text)
        try:
            self.ctx.jobs.event(self.job_id, "message", {"attempt": self.attempt, "text": text})
        except DBAPIError as exc:
            if not is_transient(exc):
                raise

    def upload_files(self, paths: list[Path]) -> None:
        prefix = job_prefix(self.job_id)
        items = [(p.name, f"{prefix}/{p.name}", self.ctx.store.put_file(f"{prefix}/{p.name}", p)) for p in paths]
        retry_db(lambda: self.ctx.jobs.add_artifacts(self.job_id, items), "record artifacts")

    def should_stop(self) -> bool:
        if os.getppid() != self.parent:  # the worker died (no PDEATHSIG here): stop, nobody waits for us
            raise JobLost()
        if time.monotonic() - self.last_write >= 1.0:  # heartbeat: re-send the latest progress, not a blank one
            self._write(self.last_progress)
        return self.status == JobStatus.cancelling.value


def _materialize_dataset(ctx: ServiceContext, dataset: Any, workdir: Path) -> str:
    if dataset.kind == "builtin":
        return dataset_spec(dataset)
    local = workdir / "dataset.zip"
    if not local.exists():
        ctx.store.get_file(dataset.key, local)
    return str(local)


def _limits(ctx: ServiceContext) -> LoadLimits:
    s = ctx.settings
    return LoadLimits(
        max_files=s.max_images, max_total_bytes=s.max_uncompressed_bytes, max_image_pixels=s.max_image_pixels
    )


def run_job_stages(ctx: ServiceContext, job: JobRow, attempt: int, workdir: Path) -> dict[str, Any]:
    """Run the job's stages in `workdir`; returns {"metrics", "model_id"}. Raises NNMError for bad input."""
    dataset = ctx.jobs.get_dataset(job.dataset_id)
    if dataset is None:
        raise NNMError(f"dataset {job.dataset_id} no longer exists")
    out = workdir / "out"
    out.mkdir(parents=True, exist_ok=True)
    # Resume: whatever this job already uploaded (finished stages, the last checkpoint).
    download_prefix(ctx.store, job_prefix(job.id), out)
    spec = _materialize_dataset(ctx, dataset, workdir)
    params = job.params
    init = (params.get("pretext") or {}).get("init") if isinstance(params.get("pretext"), dict) else None
    if isinstance(init, str) and init.startswith(BACKBONE_PREFIX):  # an uploaded backbone: fetch it
        local = workdir / "backbone.pt"
        if not local.exists():
            ctx.store.get_file(f"backbones/{job.owner}/{init[len(BACKBONE_PREFIX):]}.pt", local)
        params = {**params, "pretext": {**params["pretext"], "init": str(local)}}
    cfg: PipelineConfig = resolve(dataset, params, ctx.settings.device, spec=spec)
    inputs = job.inputs or {}
    for name, stage in INPUT_STAGE.items():
        if inputs.get(name) and not (out / stage / "done.json").exists():
            download_prefix(ctx.store, f"{job_prefix(inputs[name])}/{stage}", out / stage)
    stages = [s for s in STAGES[job.type] if s != "selflabel" or cfg.selflabel.enabled]
    sink = ServiceSink(ctx, job, attempt, out, stages)
    rt = cfg.runtime
    d = cfg.data

    def data_for(split: str | None = None):
        return load_dataset(spec, split, d.image_size, d.root, limits=_limits(ctx))

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
        sink.stage_started("evaluate", 1, 1)
        trained = export_model(out / job.type, data, out / "model")
        metrics = run_evaluate(trained, data, out, cfg.evaluate, rt)
        sink.stage_finished("evaluate", metrics)
    else:  # evaluate
        model_row = ctx.jobs.get_model(inputs["model_id"])
        download_prefix(ctx.store, model_row.key_prefix, workdir / "model")
        sink.stage_started("evaluate", 1, 1)
        metrics = run_evaluate(TrainedModel.load(workdir / "model"), data_for(), out, cfg.evaluate, rt)
        sink.stage_finished("evaluate", metrics)

    # Final files: metrics, pictures, assignments (top level of `out`) and the model.
    sink.upload_files([p for p in sorted(out.iterdir()) if p.is_file() and not p.name.startswith(".")])
    if (out / "model").is_dir():
        sink.upload(out / "model", "model")
    model_id = None
    if (out / "model" / "model.json").exists() and job.type != "evaluate":
        info = json.loads((out / "model" / "model.json").read_text())
        row = ctx.jobs.add_model(
            owner=job.owner,
            job_id=job.id,
            dataset_id=job.dataset_id,
            key_prefix=f"{job_prefix(job.id)}/model",
            clusters=info["clusters"],
            class_names=info.get("class_names"),
            metrics={k: metrics[k] for k in HEADLINE_METRICS if metrics and k in metrics},
        )
        model_id = row.id
    return {"metrics": _jsonable_metrics(metrics), "model_id": model_id}


def _jsonable_metrics(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    if metrics is None:
        return None
    keep = {k: v for k, v in metrics.items() if k not in {"cluster_to_class", "confusion_matrix"}}
    return json.loads(json.dumps(keep, default=str))
