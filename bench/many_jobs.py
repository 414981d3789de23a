"""Many jobs through the production path: J `quick` pipeline jobs queued at once across W Celery worker
processes (Postgres job store, Redis broker, a SeaweedFS S3 server, the gateway), as docker-compose
scaled to W workers runs them.

Checks that every job ran exactly once (status succeeded, one claim each, and the workers' own
Prometheus counters of started jobs sum to J) and reports the throughput in jobs per minute, from the
first submission to the last job finished.

    python bench/many_jobs.py --jobs 1000 --workers 4
    python bench/many_jobs.py --jobs 200 --workers 1      # the baseline
    python bench/many_jobs.py --jobs 25 --workers 1 --no-fork-server   # each job's child a fresh process
    python bench/many_jobs.py --jobs 100 --workers 4 --job-threads 2   # threads beyond the cores

Each worker gets its own data directory, as a container has. The job limits of the API key (by default
100 queued and 2 running per key) are raised for the run with NNM_DEFAULT_MAX_QUEUED_JOBS and
NNM_DEFAULT_MAX_RUNNING_JOBS, as an operator would for one tenant submitting a batch, and the machine's
cores are split between the workers (NNM_JOB_THREADS), as an operator sharing a machine would. Prints a JSON
summary; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from sqlalchemy import select

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from nnm.service.client import Client  # noqa: E402
from nnm.service.store.db import JobRow  # noqa: E402
from nnm.service.store.repository import JobStore  # noqa: E402
from service.servers import (  # noqa: E402
    free_port,
    postgres_database,
    redis_database,
    seaweedfs,
    start_gateway,
    start_worker,
    stop,
)


def digits_zip(path: Path, per_class: int) -> None:
    """A zip of scikit-learn digits as PNGs in class folders (the first `per_class` of each digit)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    seen: Counter[int] = Counter()
    with zipfile.ZipFile(path, "w") as zf:
        for img, label in zip(d.images, d.target, strict=True):
            if seen[int(label)] >= per_class:
                continue
            seen[int(label)] += 1
            buf = io.BytesIO()
            Image.fromarray((img * 255 / 16).astype(np.uint8)).save(buf, format="PNG")
            zf.writestr(f"{label}/{seen[int(label)]}.png", buf.getvalue())


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def started_total(ports: list[int]) -> float:
    """Sum of nnm_worker_jobs_started over every worker's metrics endpoint."""
    total = 0.0
    for port in ports:
        for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
            if line.startswith("nnm_worker_jobs_started_total{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def job_rows(store: JobStore) -> list[JobRow]:
    """Every job in the benchmark's database, oldest first, read through the service's job store."""
    with store.session() as s:
        return list(s.scalars(select(JobRow).order_by(JobRow.created_at)))


def rss_mib(pids: list[int]) -> float:
    """Resident memory of the processes `pids` and all their descendants, MiB."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,rss="], capture_output=True, text=True, check=True).stdout
    rows = [tuple(int(x) for x in line.split()) for line in out.splitlines() if line.strip()]
    children: dict[int, list[int]] = {}
    for pid, ppid, _ in rows:
        children.setdefault(ppid, []).append(pid)
    rss = {pid: kb for pid, _, kb in rows}
    todo, total = list(pids), 0
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total / 1024


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--per-class", type=int, default=10, help="digits per class in the uploaded set")
    ap.add_argument("--timeout", type=float, default=4 * 3600)
    ap.add_argument("--no-fork-server", action="store_true",
                    help="start every job's child as a fresh process (NNM_FORK_SERVER=0), as before the fork server")
    ap.add_argument("--job-threads", type=int, default=None,
                    help="NNM_JOB_THREADS of every worker (default: the cores split between the workers)")
    args = ap.parse_args()
    job_threads = args.job_threads or max(1, (os.cpu_count() or 1) // args.workers)
    # `kill` of the benchmark stops its servers and workers too (the `finally` blocks run).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result: dict = {"machine": f"{cpu_name()}, {os.cpu_count()} cores, CPU only", "jobs": args.jobs,
                    "workers": args.workers, "images": 10 * args.per_class, "preset": "quick",
                    "fork_server": not args.no_fork_server, "job_threads": job_threads}
    with tempfile.TemporaryDirectory() as tmp_name, postgres_database() as pg, redis_database() as broker, \
            seaweedfs(Path(tmp_name) / "s3") as s3:
        tmp = Path(tmp_name)
        env = {k: v for k, v in os.environ.items() if not k.startswith("NNM_")}
        env.update({"NNM_DATABASE_URL": pg, "NNM_BROKER_URL": broker, "NNM_S3_ENDPOINT": s3["endpoint"],
                    "NNM_S3_ACCESS_KEY": s3["access_key"], "NNM_S3_SECRET_KEY": s3["secret_key"],
                    "NNM_DEVICE": "cpu", "NNM_DEFAULT_MAX_QUEUED_JOBS": str(args.jobs),
                    "NNM_DEFAULT_MAX_RUNNING_JOBS": str(args.workers),
                    "NNM_FORK_SERVER": "0" if args.no_fork_server else "1", "NNM_JOB_THREADS": str(job_threads)})
        subprocess.run([sys.executable, "-m", "nnm.cli.main", "migrate"], env=env | {"NNM_DATA_DIR": str(tmp / "gw")},
                       check=True, capture_output=True)
        workers, ports = [], []
        gw = None
        store = JobStore(pg)
        try:
            for i in range(args.workers):
                ports.append(free_port())
                wenv = env | {"NNM_DATA_DIR": str(tmp / f"w{i}"), "NNM_WORKER_METRICS_PORT": str(ports[-1])}
                workers.append(start_worker(wenv, tmp / f"worker{i}.log", name=f"w{i}"))
            gw, base = start_gateway(env | {"NNM_DATA_DIR": str(tmp / "gw")}, tmp / "gateway.log")
            client = Client(base, timeout=120)
            digits_zip(tmp / "digits.zip", args.per_class)
            ds = client.upload_dataset(tmp / "digits.zip")
            t0 = time.perf_counter()
            ids = [client.submit("pipeline", ds["id"], {"preset": "quick"})["id"] for _ in range(args.jobs)]
            result["submit_s"] = round(time.perf_counter() - t0, 1)
            deadline = time.monotonic() + args.timeout
            peak_rss = 0.0
            while True:
                rows = job_rows(store)
                peak_rss = max(peak_rss, rss_mib([w.pid for w in workers]))
                if all(r.status in ("succeeded", "failed", "cancelled") for r in rows):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{sum(r.status == 'succeeded' for r in rows)} of {args.jobs} done")
                time.sleep(2)
            wall = time.perf_counter() - t0
            statuses = Counter(r.status for r in rows)
            attempts = Counter(r.attempt for r in rows)
            # Attempts each worker process logged starting (its pool children and job children included).
            per_worker = {f"w{i}": (tmp / f"worker{i}.log").read_text().count(" starting [job_id=")
                          for i in range(args.workers)}
            durations = [(r.finished_at - r.started_at).total_seconds() for r in rows if r.started_at and r.finished_at]
            started = started_total(ports)
            result.update({
                "wall_s": round(wall, 1),
                "jobs_per_minute": round(60 * args.jobs / wall, 2),
                "statuses": dict(statuses),
                "attempts": {str(k): v for k, v in sorted(attempts.items())},
                "jobs_started_by_workers": started,
                "submitted_ids_unique": len(set(ids)) == args.jobs == len(rows),
                "attempts_started_per_worker": per_worker,
                "job_seconds": {"median": round(statistics.median(durations), 2),
                                "max": round(max(durations), 2)},
                "workers_peak_rss_mib": round(peak_rss),
                "exactly_once": statuses.get("succeeded") == args.jobs and attempts == {1: args.jobs}
                and started == args.jobs == sum(per_worker.values()),
            })
            client.close()
        finally:
            store.dispose()
            if gw is not None:
                stop(gw)
            for w in workers:
                stop(w, timeout=60)
    print(json.dumps(result, indent=2))
    return 0 if result.get("exactly_once") else 1


if __name__ == "__main__":
    sys.exit(main())
