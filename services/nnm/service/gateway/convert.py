"""Database rows -> API response models."""

from __future__ import annotations

from urllib.parse import quote

from api_schemas import ArtifactOut, DatasetOut, JobInputs, JobOut, ModelOut, Problem, Progress, StageOut

from ..store.db import ArtifactRow, DatasetRow, JobRow, ModelRow


def dataset_out(row: DatasetRow) -> DatasetOut:
    return DatasetOut(
        id=row.id,
        name=row.name,
        kind=row.kind,
        builtin=row.builtin,
        split=row.split,
        image_count=row.image_count,
        image_size=row.image_size,
        channels=row.channels,
        classes=row.classes,
        labelled=bool(row.classes),
        size_bytes=row.size_bytes,
        created_at=row.created_at,
    )


def job_out(row: JobRow, artifacts: list[ArtifactRow]) -> JobOut:
    progress = (
        Progress(**{k: v for k, v in (row.progress or {}).items() if k in Progress.model_fields})
        if row.progress
        else None
    )
    stages = [StageOut(**{k: v for k, v in s.items() if k in StageOut.model_fields}) for s in (row.stages or [])]
    return JobOut(
        id=row.id,
        type=row.type,
        status=row.status,
        dataset_id=row.dataset_id,
        inputs=JobInputs(**(row.inputs or {})),
        params=row.params or {},
        config=row.config,
        attempt=row.attempt,
        max_attempts=row.max_attempts,
        stage=row.stage,
        stages=stages,
        progress=progress,
        metrics=row.metrics,
        error=Problem(**row.error) if row.error else None,
        artifacts=[
            ArtifactOut(name=a.name, size=a.size, url=f"/v1/jobs/{row.id}/artifacts/{quote(a.name)}") for a in artifacts
        ],
        model_id=row.model_id,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def model_out(row: ModelRow) -> ModelOut:
    return ModelOut(
        id=row.id,
        job_id=row.job_id,
        dataset_id=row.dataset_id,
        clusters=row.clusters,
        class_names=row.class_names,
        metrics=row.metrics,
        created_at=row.created_at,
    )
