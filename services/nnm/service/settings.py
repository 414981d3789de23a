"""Service settings, read from NNM_* environment variables (documented in .env.example).

With no variables set the service runs embedded: SQLite and a local artifact directory under
`NNM_DATA_DIR`, and jobs executed by worker threads of the gateway's own host process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Root for the embedded database, artifacts, caches and job work directories.
    data_dir: Path = Path("nnm-data")
    #: Apply database migrations when the gateway starts (compose runs a one-shot migrate service instead).
    auto_migrate: bool = True
    #: Where jobs download built-in datasets such as CIFAR-10 (None: data_dir/cache/datasets).
    datasets_dir: Path | None = None
    #: SQLAlchemy URL of the job store (default: SQLite in data_dir).
    database_url: str | None = None
    #: Celery broker (e.g. redis://redis:6379/0); unset runs jobs in-process (embedded mode).
    broker_url: str | None = None
    #: S3 endpoint host:port (unset: artifacts in data_dir/artifacts).
    s3_endpoint: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: SecretStr | None = None
    s3_bucket: str = "nnm"
    s3_secure: bool = False
    s3_region: str = "us-east-1"
    #: Endpoint users reach, used to sign presigned URLs (default: s3_endpoint).
    s3_public_endpoint: str | None = None
    s3_public_secure: bool | None = None
    presign_expiry_s: int = Field(900, ge=1, le=7 * 24 * 3600)
    #: Files smaller than this are streamed by the API; larger ones are redirected to S3.
    stream_limit_bytes: int = Field(32 * 1024 * 1024, ge=0)
    max_upload_bytes: int = Field(1024**3, ge=1)
    max_images: int = Field(200_000, ge=1)
    #: Pixels of one image, read from its header before decoding (4096 x 4096; a decoded RGB image of
    #: that size is 48 MiB, and the gateway decodes only a few at once).
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    #: Bytes an uploaded archive's images may expand to, all together. Members are inflated in chunks,
    #: never whole, so this bounds inflating work and temporary disk, not memory: 2 GiB is twice the
    #: largest upload, room for BMP/PPM sets that zip compresses well.
    max_uncompressed_bytes: int = Field(2 * 1024**3, ge=1)
    #: Bytes one image file in an archive may expand to (a 4096 x 4096 RGBA image stored raw is 64 MiB).
    max_member_bytes: int = Field(128 * 1024**2, ge=1)
    #: Pixels the images of one uploaded dataset may decode to together, read from their headers before
    #: any is decoded (2**34, about 17 billion: 340,000 images of 224 x 224, or minutes of decoding; it
    #: bounds the gateway's CPU time per upload, as the caps above bound its memory and disk).
    max_upload_pixels: int = Field(2**34, ge=1)
    max_assign_files: int = Field(512, ge=1)
    #: Pixels the images of one assign request may decode to together, read from their headers: the
    #: gateway decodes them while the caller waits (2**30: 64 images at the pixel limit; JPEGs count
    #: at the reduced scale they are decoded at).
    max_assign_pixels: int = Field(1024**3, ge=1)
    #: Concurrent assign requests share forward passes: the inference thread waits this long for more
    #: requests when fewer than `assign_max_batch` images are queued.
    assign_batch_window_ms: float = Field(2.0, ge=0, le=1000)
    #: Images classified in one forward pass.
    assign_max_batch: int = Field(256, ge=1)
    #: Images queued for classification in one gateway process beyond which assign requests get 503 with
    #: Retry-After (a few seconds of work on 2 cores), rather than waiting behind minutes of it.
    assign_queue_images: int = Field(4096, ge=1)
    #: Attempts before a job whose worker keeps dying is failed.
    job_max_attempts: int = Field(3, ge=1)
    #: A running job whose heartbeat is older than this may be taken over by another worker.
    heartbeat_timeout_s: float = Field(60.0, gt=0)
    #: Seconds between uploads of a running stage's checkpoint (resume after a lost worker).
    checkpoint_upload_interval_s: float = Field(30.0, ge=0)
    #: Celery hard time limit of one job; the broker visibility timeout is set above it.
    job_time_limit_s: int = Field(7 * 24 * 3600, ge=60)
    #: Seconds a cancelled job's child gets between SIGTERM and SIGKILL.
    cancel_grace_s: float = Field(10.0, ge=0)
    #: Processes one job trains on, on the worker's machine (its GPUs, one each; CPU processes without
    #: them): above 1 the worker starts the job through torchrun and every stage trains with DDP.
    processes_per_job: int = Field(1, ge=1, le=64)
    #: Fork each job's child from a server per worker slot that imported torch and the engine once
    #: (worker/forkserver.py), instead of a fresh process importing them again (about 9 s on 2 cores).
    fork_server: bool = True
    #: Most CPU threads torch uses in each process of a job (None: torch's default, every core this
    #: machine shows). Workers sharing a machine should split its cores: threads of concurrent jobs
    #: beyond the cores slow every job down (4 workers of 2 threads on 2 cores ran 0.37x the jobs per
    #: minute of one worker; of 1 thread, 1.18x).
    job_threads: int | None = Field(None, ge=1, le=1024)
    #: Device for training jobs: auto, cpu or cuda.
    device: str = "auto"
    #: Embedded mode: concurrent jobs per queue.
    embedded_gpu_slots: int = Field(1, ge=1)
    embedded_cpu_slots: int = Field(1, ge=1)
    log_level: str = "INFO"
    #: Log records as `text` (a terminal) or `json` (one object a line with job_id and request_id, for a
    #: log collector; compose and deploy/k8s use it).
    log_format: str = Field("text", pattern="^(text|json)$")
    #: Port on which a Celery worker serves its Prometheus metrics (jobs by outcome, stage durations,
    #: images/s, attempts, queue depth), on every interface of its container: 0 serves none. Unauthenticated,
    #: like most exporters: publish it on the private network only (compose does not publish it).
    worker_metrics_port: int = Field(0, ge=0, le=65535)
    #: API keys: "auto" requires them once one exists (`nnm keys create`), "required" always, "off" never.
    auth: str = Field("auto", pattern="^(auto|required|off)$")
    #: A key with the `admin` scope only, from the deployment's secrets (at least 32 characters): it manages
    #: keys through /v1/admin/keys, so that the first key needs no database access. Unset: only keys
    #: created with the `admin` scope (`nnm keys create --scopes admin`) can.
    admin_key: SecretStr | None = Field(None, min_length=32)
    #: Limits of keys that set none: running jobs, queued + running jobs, dataset uploads per minute.
    default_max_running_jobs: int = Field(2, ge=1)
    default_max_queued_jobs: int = Field(100, ge=1)
    default_uploads_per_minute: int = Field(30, ge=1)
    #: Largest body of a request that is not an upload (JSON job requests and the like).
    max_json_bytes: int = Field(1024 * 1024, ge=1024)
    #: Days after which a finished job's artifacts are deleted (the job's record and metrics stay); 0 keeps them.
    artifact_retention_days: float = Field(0, ge=0)
    #: Bytes a worker's decoded-image cache (large data sets decoded once, then memory-mapped by every
    #: job on them) may hold; the sets used longest ago are removed past it.
    decoded_cache_max_bytes: int = Field(50 * 1024**3, ge=0)
    #: Seconds between passes of the reconciler in the gateway (0 disables it).
    reconcile_interval_s: float = Field(15.0, ge=0)

    @property
    def embedded_queue(self) -> bool:
        return not self.broker_url

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'nnm.db').resolve()}"

    @property
    def work_dir(self) -> Path:
        return self.data_dir / "work"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @property
    def decoded_dir(self) -> Path:
        """The workers' decoded-image cache (`nnm.engine.cache`)."""
        return self.cache_dir / "decoded"


ENV_PREFIX = "NNM_"
#: Every environment variable the settings read (what docker-compose, .env.example and the manifests may set).
ENV_NAMES = frozenset(f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields)


def load_settings(env: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from NNM_* variables of `env` (default: os.environ), then `overrides`."""
    env = dict(os.environ if env is None else env)
    values: dict[str, Any] = {}
    fields = Settings.model_fields
    for key, raw in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name in fields and raw != "":
            values[name] = raw
    values.update(overrides)
    try:
        return Settings.model_validate(values)
    except ValidationError as err:
        problems = "; ".join(f"{ENV_PREFIX}{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in err.errors())
        raise ValueError(f"invalid settings: {problems}") from None
