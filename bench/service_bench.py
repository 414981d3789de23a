"""Service benchmark on this machine, through the production path (Postgres, Redis, a SeaweedFS S3
server, one Celery worker process and the gateway process, started as docker-compose starts them):

1. time from POST /v1/jobs to `running` for a queued job on an idle worker;
2. assignment latency for one image, and images/s for a batch of 256 (CPU, through the API);
3. the pipeline's wall time through the API against the same run through `nnm pipeline`.

    python bench/service_bench.py [--preset cpu] [--dataset digits] [--skip-pipeline]

Prints a JSON summary; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from nnm.service.client import Client  # noqa: E402
from service.servers import postgres_database, redis_database, seaweedfs, start_gateway, start_worker, stop  # noqa: E402


def digit_pngs(n: int) -> list[tuple[str, bytes]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray((d.images[i % len(d.images)] * 255 / 16).astype(np.uint8)).save(buf, format="PNG")
        out.append((f"{i}.png", buf.getvalue()))
    return out


def post_to_running(client: Client, dataset_id: str, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        job = client.submit("pretext", dataset_id, {"preset": "quick", "pretext": {"epochs": 1}})
        while client.job(job["id"])["status"] == "queued":
            time.sleep(0.01)
        out.append(time.perf_counter() - t0)
        client.wait(job["id"], timeout=600, poll_s=0.2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--skip-pipeline", action="store_true")
    args = ap.parse_args()
    result: dict = {"machine": "2-core x86_64 (Xeon with AMX), CPU only", "preset": args.preset}
    with tempfile.TemporaryDirectory() as tmp, postgres_database() as pg, redis_database() as broker, \
            seaweedfs(Path(tmp) / "s3") as s3:
        env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("NNM_")}
        env.update({"NNM_DATABASE_URL": pg, "NNM_BROKER_URL": broker, "NNM_S3_ENDPOINT": s3["endpoint"],
                    "NNM_S3_ACCESS_KEY": s3["access_key"], "NNM_S3_SECRET_KEY": s3["secret_key"],
                    "NNM_DATA_DIR": str(Path(tmp) / "data"), "NNM_DEVICE": "cpu"})
        subprocess.run([sys.executable, "-m", "nnm.cli.main", "migrate"], env=env, check=True, capture_output=True)
        worker = start_worker(env, Path(tmp) / "worker.log")
        gw, base = start_gateway(env, Path(tmp) / "gateway.log")
        client = Client(base, timeout=600)
        try:
            ds = client.builtin_dataset(args.dataset)
            lat = post_to_running(client, ds["id"], 5)
            result["post_to_running_s"] = {"median": statistics.median(lat), "max": max(lat), "runs": lat}
            # A model to assign with (quick preset: assignment cost does not depend on training length).
            job = client.wait(client.submit("pipeline", ds["id"], {"preset": "quick"})["id"], timeout=1800)
            model_id = job["model_id"]
            one = digit_pngs(1)
            client.assign(model_id, one)  # warm-up: downloads and loads the model
            singles = []
            for _ in range(30):
                t0 = time.perf_counter()
                client.assign(model_id, one)
                singles.append(time.perf_counter() - t0)
            batch = digit_pngs(256)
            rates = []
            for _ in range(5):
                t0 = time.perf_counter()
                assert len(client.assign(model_id, batch)) == 256
                rates.append(256 / (time.perf_counter() - t0))
            result["assign_one_image_ms"] = {"median": 1000 * statistics.median(singles),
                                             "p95": 1000 * sorted(singles)[int(0.95 * len(singles)) - 1]}
            result["assign_batch_256_images_per_s"] = {"median": statistics.median(rates)}
            if not args.skip_pipeline:
                t0 = time.perf_counter()
                job = client.wait(client.submit("pipeline", ds["id"], {"preset": args.preset})["id"], timeout=7200,
                                  poll_s=2)
                api_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                out = Path(tmp) / "cli-run"
                subprocess.run([sys.executable, "-m", "nnm.cli.main", "pipeline", "--dataset", args.dataset,
                                "--preset", args.preset, "--quiet", "--out", str(out)], check=True,
                               capture_output=True, env=env)
                cli_s = time.perf_counter() - t0
                cli_acc = json.loads((out / "metrics.json").read_text())["acc"]
                result["pipeline"] = {"api_wall_s": api_s, "cli_wall_s": cli_s, "overhead_s": api_s - cli_s,
                                      "overhead_pct": 100 * (api_s - cli_s) / cli_s, "api_acc": job["metrics"]["acc"],
                                      "cli_acc": cli_acc}
        finally:
            client.close()
            stop(gw)
            stop(worker, timeout=60)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
