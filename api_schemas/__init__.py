"""Request and response models of the nnm REST API (pydantic v2), shared by gateway and workers.

`api_schemas/openapi.json` is the checked-in OpenAPI document of the gateway; a test keeps it in
sync with the app (regenerate with `python -m nnm.service.gateway.openapi`).
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobType(str, Enum):
    pretext = "pretext"
    mine = "mine"
    cluster = "cluster"
    selflabel = "selflabel"
    evaluate = "evaluate"
    pipeline = "pipeline"


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelling = "cancelling"
    cancelled = "cancelled"


TERMINAL_STATUSES = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})

BuiltinDataset = Literal["cifar10", "cifar20", "stl10", "digits", "mnist5k"]


class Problem(BaseModel):
    """RFC 9457 problem details; `errors` lists field-level problems of a validation failure."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None


class BuiltinDatasetCreate(_Model):
    """JSON body of POST /v1/datasets for a built-in dataset."""

    builtin: BuiltinDataset
    name: str | None = Field(None, max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")
    split: str | None = Field(None, max_length=40, description="e.g. 'test', 'train+unlabeled'")


class DatasetOut(_Model):
    id: str
    name: str
    kind: Literal["upload", "builtin"]
    builtin: str | None = None
    split: str | None = None
    image_count: int | None = None
    image_size: int | None = None
    channels: int | None = None
    classes: list[str] | None = None
    labelled: bool
    size_bytes: int | None = None
    created_at: datetime


class PreviewImage(_Model):
    name: str
    #: A PNG data URI.
    thumbnail: str


class DatasetPreview(_Model):
    dataset_id: str
    images: list[PreviewImage]


class DatasetList(_Model):
    items: list[DatasetOut]
    next_cursor: str | None = None


#: An id as the API issues them, or anything the database can compare (no control characters).
IdText = Annotated[str, Field(max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")]


class JobInputs(_Model):
    """Earlier results a job builds on (by job id; a pipeline job counts as having every stage)."""

    pretext_job_id: IdText | None = None
    mine_job_id: IdText | None = None
    cluster_job_id: IdText | None = None
    model_id: IdText | None = None


class JobCreate(_Model):
    type: JobType
    dataset_id: IdText
    inputs: JobInputs = Field(default_factory=JobInputs)
    #: The engine's settings: {"preset": NAME, "pretext": {...}, "cluster": {...}, ...}.
    params: dict[str, Any] = Field(default_factory=dict)


class Progress(_Model):
    stage: str | None = None
    epoch: int | None = None
    epochs: int | None = None
    step: int | None = None
    steps: int | None = None
    fraction: float | None = None
    loss: float | None = None
    images_per_s: float | None = None
    updated_at: datetime | None = None


class StageOut(_Model):
    name: str
    status: Literal["pending", "running", "succeeded"]
    started_at: datetime | None = None
    finished_at: datetime | None = None


class ArtifactOut(_Model):
    name: str
    size: int
    url: str


class JobOut(_Model):
    id: str
    type: JobType
    status: JobStatus
    dataset_id: str
    inputs: JobInputs
    #: The request's params with the preset and the device fixed at submission.
    params: dict[str, Any]
    #: The whole engine configuration the job trains with, resolved when it was submitted.
    config: dict[str, Any] | None = None
    attempt: int
    max_attempts: int
    stage: str | None = None
    stages: list[StageOut] = Field(default_factory=list)
    progress: Progress | None = None
    metrics: dict[str, Any] | None = Field(
        None,
        description=(
            "The job's figures (acc, nmi, ari, top5 where labels exist). `evaluated_on` names the split they "
            "come from: `test` when the dataset has a test split that was not trained on (built-ins with one, "
            "uploads with train/ and test/ folders), then the clustered images' own figures are under `train`; "
            "otherwise `train` (the clustered images)."
        ),
    )
    error: Problem | None = None
    artifacts: list[ArtifactOut] = Field(default_factory=list)
    model_id: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


class JobList(_Model):
    items: list[JobOut]
    next_cursor: str | None = None


class ModelOut(_Model):
    id: str
    job_id: str
    dataset_id: str
    clusters: int
    class_names: list[str] | None = None
    metrics: dict[str, Any] | None = None
    created_at: datetime


class ModelList(_Model):
    items: list[ModelOut]
    next_cursor: str | None = None


class Assignment(_Model):
    filename: str
    cluster: int
    confidence: float
    class_name: str | None = None


class GalleryImage(_Model):
    """One clustered image of a job's gallery."""

    #: Position in the clustered data set (stable: use it to ask for the image's neighbours).
    index: int
    name: str
    cluster: int
    confidence: float
    #: The image's class where the data set has labels (never used for training).
    label: str | None = None
    #: A PNG data URI of the thumbnail (absent when `thumbnails=false` was asked).
    thumbnail: str | None = None


class ClusterOut(_Model):
    cluster: int
    size: int
    mean_confidence: float
    #: The class most of its images have, and their share (labelled data sets only).
    majority_class: str | None = None
    purity: float | None = None
    #: The images nearest the mean feature of its most confident members.
    prototypes: list[GalleryImage] = Field(default_factory=list)


class ClusterList(_Model):
    job_id: str
    num_images: int
    class_names: list[str] | None = None
    #: How many mined neighbours each image has in the gallery (0: none were mined).
    neighbors: int
    clusters: list[ClusterOut]


class GalleryPage(_Model):
    """Members of one cluster, most confident first."""

    cluster: int
    total: int
    offset: int
    items: list[GalleryImage]
    next_offset: int | None = None


class GalleryImageDetail(_Model):
    image: GalleryImage
    #: Its mined nearest neighbours, nearest first.
    neighbors: list[GalleryImage]


#: What an API key may do: `read` (GET), `write` (everything else), `metrics` (Prometheus' /metrics),
#: `admin` (/v1/admin: manage keys).
KeyScope = Literal["read", "write", "metrics", "admin"]


class KeyCreate(_Model):
    """Body of POST /v1/admin/keys. Limits left out take the service's defaults."""

    name: str = Field(..., min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$",
                      examples=["ci-pipeline"])
    scopes: list[KeyScope] = Field(default_factory=lambda: ["read", "write"], min_length=1, max_length=4)
    max_running_jobs: int | None = Field(None, ge=1, le=10_000)
    max_queued_jobs: int | None = Field(None, ge=1, le=1_000_000)
    uploads_per_minute: int | None = Field(None, ge=1, le=100_000)


class KeyOut(_Model):
    """An API key's record (never the key: only its hash is kept)."""

    id: str
    name: str
    scopes: list[str]
    max_running_jobs: int | None = None
    max_queued_jobs: int | None = None
    uploads_per_minute: int | None = None
    created_at: datetime
    revoked_at: datetime | None = None


class KeyCreated(KeyOut):
    #: The key itself, shown in this answer only.
    key: str


class KeyList(_Model):
    items: list[KeyOut]


class Health(_Model):
    status: Literal["ok", "ready", "not ready"]
    checks: dict[str, str] = Field(default_factory=dict)
