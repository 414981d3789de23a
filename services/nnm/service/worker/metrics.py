"""Prometheus metrics of a Celery worker: jobs started and finished by outcome, job and stage durations,
training images/s, attempts, and the depth of each queue.

Three kinds of process write them: Celery's pool process runs one job and exits (one task per child),
and the job trains in a child of that. prometheus_client's multiprocess mode keeps each process's
values in files under PROMETHEUS_MULTIPROC_DIR (set by the worker's main process before it forks, and
inherited), and the main process serves their sum, with the queue depths read from the job store at
scrape time, on NNM_WORKER_METRICS_PORT.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("nnm.worker")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Seconds: a stage or job from a few seconds (digits) to a day (the papers' presets on one GPU).
DURATION_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200, 86400)


def prepare_multiprocess_dir(work_dir: Path, pid: int) -> Path:
    """Point prometheus_client of this process and its children at a fresh directory of their own, and
    remove the directories of worker processes that are gone. Call before any metric is created."""
    root = work_dir / "prometheus"
    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():
        if old.name.isdigit() and not _alive(int(old.name)):
            shutil.rmtree(old, ignore_errors=True)
    path = root / str(pid)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    os.environ[MULTIPROC_ENV] = str(path)
    from prometheus_client import values

    values.ValueClass = values.get_value_class()  # in case prometheus_client was imported before
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class WorkerMetrics:
    jobs_started: Any
    jobs_finished: Any
    job_seconds: Any
    attempt: Any
    stage_seconds: Any
    images_per_second: Any


@functools.cache
def worker_metrics() -> WorkerMetrics:
    """This process's metric objects (created on first use, in the process that writes them; in
    multiprocess mode they write to files, so none is registered in a registry here)."""
    from prometheus_client import Counter, Gauge, Histogram

    return WorkerMetrics(
        jobs_started=Counter("nnm_worker_jobs_started", "Job attempts a worker started", ["queue", "type"],
                             registry=None),
        jobs_finished=Counter(
            "nnm_worker_jobs_finished",
            "Job attempts a worker ended, by outcome: succeeded, failed, cancelled, requeued (crashed or "
            "handed back, to be resumed), lost (another worker owns the job now)",
            ["queue", "type", "outcome"], registry=None),
        job_seconds=Histogram("nnm_worker_job_seconds", "Wall time of a job attempt", ["type", "outcome"],
                              buckets=DURATION_BUCKETS, registry=None),
        attempt=Histogram("nnm_worker_job_attempt", "Attempt number of the job attempts started", ["queue"],
                          buckets=(1, 2, 3, 5, 10), registry=None),
        stage_seconds=Histogram("nnm_worker_stage_seconds", "Wall time of a training stage run to its end",
                                ["stage"], buckets=DURATION_BUCKETS, registry=None),
        images_per_second=Gauge("nnm_worker_images_per_second", "Training throughput of the latest progress "
                                "report of a stage", ["stage"], multiprocess_mode="mostrecent", registry=None),
    )


def enabled() -> bool:
    """Whether this process writes worker metrics (a worker with NNM_WORKER_METRICS_PORT set)."""
    return bool(os.environ.get(MULTIPROC_ENV))


class QueueDepth:
    """Collector: jobs queued, running and cancelling per queue, from the job store at scrape time."""

    def __init__(self, jobs: Any):
        self.jobs = jobs

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        g = GaugeMetricFamily("nnm_queue_jobs", "Jobs queued, running or cancelling, per queue",
                              labels=["queue", "status"])
        try:
            counts = self.jobs.count_active_by_queue()
        except Exception:  # the store is unreachable: no sample, not a failed scrape
            log.warning("queue depth not collected: job store unreachable")
            return
        from ..queue import QUEUES
        from ..store.repository import ACTIVE

        for queue in QUEUES:
            for status in ACTIVE:
                g.add_metric([queue, status], counts.get((queue, status), 0))
        yield g


def serve_metrics(port: int, jobs: Any) -> Any:
    """Serve the sum of every process's metrics and the queue depths on `port` (a daemon thread)."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    registry.register(QueueDepth(jobs))
    server, _thread = start_http_server(port, addr="0.0.0.0", registry=registry)
    log.info("worker metrics on port %d", port)
    return server
