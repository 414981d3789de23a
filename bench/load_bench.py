"""Load on the production path (Postgres, Redis, SeaweedFS S3, Celery workers, gateway process):

1. 50 concurrent clients posting one image each to POST /v1/models/{id}/assign for 60 s:
   requests/s, p50/p99 latency, errors, and the gateway's resident memory over the run;
2. 200 jobs submitted in a burst: all accepted, none lost, each run exactly once.

    python bench/load_bench.py [--clients 50] [--seconds 60] [--jobs 200] [--workers 2] [--parts assign burst]

The assignment figures are timings: run that part on a quiet machine. The burst checks counts only.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from nnm.service.client import Client  # noqa: E402
from nnm.service.store.repository import JobStore  # noqa: E402
from service.servers import (  # noqa: E402
    postgres_database,
    redis_database,
    seaweedfs,
    start_gateway,
    start_worker,
    stop,
)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def digit_png(i: int) -> bytes:
    from sklearn.datasets import load_digits

    buf = io.BytesIO()
    Image.fromarray((load_digits().images[i] * 255 / 16).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def assignment_load(base: str, model_id: str, clients: int, seconds: float, gateway_pid: int) -> dict:
    image = digit_png(3)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    memory: list[float] = []

    def client_loop() -> None:
        with httpx.Client(base_url=base, timeout=60) as http:
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                try:
                    r = http.post(f"/v1/models/{model_id}/assign", files=[("files", ("x.png", image, "image/png"))])
                    ok = r.status_code == 200
                    err = None if ok else f"HTTP {r.status_code}"
                except httpx.HTTPError as exc:
                    ok, err = False, exc.__class__.__name__
                dt = time.perf_counter() - t0
                with lock:
                    (latencies.append(dt) if ok else errors.append(err))

    def sample_memory() -> None:
        while time.monotonic() < stop_at:
            memory.append(rss_mb(gateway_pid))
            time.sleep(1)

    threads = [threading.Thread(target=client_loop) for _ in range(clients)] + [threading.Thread(target=sample_memory)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    lat = sorted(latencies)
    q = lambda p: 1000 * lat[min(len(lat) - 1, int(p * len(lat)))]  # noqa: E731
    third = max(1, len(memory) // 3)
    return {"clients": clients, "seconds": round(elapsed, 1), "requests": len(lat) + len(errors),
            "requests_per_s": round((len(lat) + len(errors)) / elapsed, 1), "errors": len(errors),
            "error_kinds": sorted(set(errors)), "p50_ms": round(q(0.50), 1), "p99_ms": round(q(0.99), 1),
            "gateway_rss_mb": {"first_third_mean": round(statistics.mean(memory[:third]), 1),
                               "last_third_mean": round(statistics.mean(memory[-third:]), 1),
                               "max": round(max(memory), 1)}}


def job_burst(client: Client, dataset_id: str, jobs: int, database_url: str) -> dict:
    params = {"preset": "quick", "pretext": {"epochs": 0}}
    started = time.perf_counter()
    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: client.http.post("/v1/jobs", json={
            "type": "pretext", "dataset_id": dataset_id, "params": params}), range(jobs)))
    accepted = [r.json()["id"] for r in responses if r.status_code == 202]
    submit_s = time.perf_counter() - started
    finals = [client.wait(job_id, timeout=7200, poll_s=2) for job_id in accepted]
    store = JobStore(database_url)
    try:
        starts = [sum(1 for e in store.events(j) if e.kind == "started") for j in accepted]
    finally:
        store.dispose()
    return {"submitted": jobs, "accepted_202": len(accepted), "submit_seconds": round(submit_s, 1),
            "succeeded": sum(f["status"] == "succeeded" for f in finals),
            "attempts_other_than_1": sum(f["attempt"] != 1 for f in finals),
            "started_events_per_job": sorted(set(starts)),
            "all_done_seconds": round(time.perf_counter() - started, 1)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--parts", nargs="+", choices=["assign", "burst"], default=["assign", "burst"])
    args = ap.parse_args()
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp, postgres_database() as pg, redis_database() as broker, \
            seaweedfs(Path(tmp) / "s3") as s3:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NNM_")}
        env.update({"NNM_DATABASE_URL": pg, "NNM_BROKER_URL": broker, "NNM_S3_ENDPOINT": s3["endpoint"],
                    "NNM_S3_ACCESS_KEY": s3["access_key"], "NNM_S3_SECRET_KEY": s3["secret_key"],
                    "NNM_DATA_DIR": str(Path(tmp) / "data"), "NNM_DEVICE": "cpu",
                    "NNM_DEFAULT_MAX_QUEUED_JOBS": str(args.jobs + 10)})
        subprocess.run([sys.executable, "-m", "nnm.cli.main", "migrate"], env=env, check=True, capture_output=True)
        workers = [start_worker(env, Path(tmp) / f"w{i}.log", name=f"w{i}") for i in range(args.workers)]
        gw, base = start_gateway(env, Path(tmp) / "gateway.log")
        client = Client(base, timeout=120)
        try:
            ds = client.builtin_dataset("digits")
            if "assign" in args.parts:
                job = client.wait(client.submit("pipeline", ds["id"], {"preset": "quick"})["id"], timeout=1800)
                client.assign(job["model_id"], [("x.png", digit_png(0))])  # load the model once
                result["assignment_load"] = assignment_load(base, job["model_id"], args.clients, args.seconds,
                                                            gw.pid)
                print(json.dumps(result, indent=2), flush=True)
            if "burst" in args.parts:
                result["job_burst"] = job_burst(client, ds["id"], args.jobs, pg)
        finally:
            client.close()
            stop(gw)
            for w in workers:
                stop(w, timeout=120)
    result["machine"] = "2-core x86_64, CPU only; gateway, workers, Postgres, Redis and SeaweedFS on the same host"
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
