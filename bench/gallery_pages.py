"""How fast the cluster browser serves pages of a 50,000-image gallery, on the production path.

Builds the gallery a pipeline job writes (`nnm.engine.gallery.write_gallery`) for the CIFAR-10 JPEGs
of ../shared/data (real images; the clustering is drawn at random, which does not matter for serving),
records it as the artifacts of a finished job in a real Postgres and SeaweedFS S3, starts the gateway
process, and times over HTTP:

- the first request for the job's clusters (the gateway downloads and opens the gallery),
- the first page (48 images with thumbnails) of each cluster,
- a page deep inside a cluster, and the same pages again (thumbnails cached).

    python bench/gallery_pages.py [--zip ../shared/data/cifar10-train-jpg.zip] [--images 50000]

Timings: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from nnm.engine.data import load_dataset  # noqa: E402
from nnm.engine.gallery import GALLERY_FILES, write_gallery  # noqa: E402
from nnm.service.settings import load_settings  # noqa: E402
from nnm.service.store.migrations import upgrade  # noqa: E402
from nnm.service.store.repository import JobStore  # noqa: E402
from nnm.service.store.storage import make_store  # noqa: E402
from service.servers import postgres_database, seaweedfs, start_gateway, stop  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def timed_get(client: httpx.Client, path: str) -> tuple[float, dict]:
    started = time.perf_counter()
    r = client.get(path)
    elapsed = time.perf_counter() - started
    r.raise_for_status()
    return elapsed, r.json()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zip", default=str(REPO.parent / "shared" / "data" / "cifar10-train-jpg.zip"))
    ap.add_argument("--images", type=int, default=50000)
    ap.add_argument("--clusters", type=int, default=10)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        started = time.perf_counter()
        data = load_dataset(args.zip)
        n = min(args.images, len(data))
        images = data.images[:n]
        decoded_s = time.perf_counter() - started
        rng = np.random.default_rng(0)
        probs = rng.dirichlet(np.full(args.clusters, 0.3), size=n).astype(np.float32)
        neighbors = np.concatenate([np.arange(n)[:, None], rng.integers(0, n, (n, 20))], axis=1)
        protos = [list(np.nonzero(probs.argmax(1) == c)[0][:5]) for c in range(args.clusters)]
        started = time.perf_counter()
        write_gallery(tmp / "gallery", images, data.names[:n], probs, protos, data.labels[:n].numpy(),
                      data.class_names, neighbors)
        write_s = time.perf_counter() - started
        sizes = {f: (tmp / "gallery" / f).stat().st_size for f in GALLERY_FILES}

        with postgres_database() as url, seaweedfs(tmp / "s3") as s3:
            upgrade(url)
            env = {k: v for k, v in os.environ.items() if not k.startswith("NNM_")}
            env.update({"NNM_DATABASE_URL": url, "NNM_S3_ENDPOINT": s3["endpoint"],
                        "NNM_S3_ACCESS_KEY": s3["access_key"], "NNM_S3_SECRET_KEY": s3["secret_key"],
                        "NNM_S3_BUCKET": s3["bucket"],
                        "NNM_DATA_DIR": str(tmp / "data"), "NNM_DEVICE": "cpu", "NNM_RECONCILE_INTERVAL_S": "0",
                        "NNM_BROKER_URL": "redis://127.0.0.1:6379/15"})
            # A finished job whose artifacts are this gallery, recorded as a worker records them.
            jobs = JobStore(url)
            os.environ.update(env)
            store = make_store(load_settings())
            ds = jobs.add_dataset(owner="public", name="cifar10", kind="upload", image_count=n, image_size=32,
                                  channels=3)
            job, _ = jobs.create_job(owner="public", type="pipeline", dataset_id=ds.id, inputs={}, params={},
                                     queue="cpu", max_attempts=1)
            claim = jobs.claim(job.id, "bench", 60)
            attempt = claim.attempt
            keys = {f: f"jobs/{job.id}/a{attempt}/gallery/{f}" for f in GALLERY_FILES}
            items = [(f"gallery/{f}", k, store.put_file(k, tmp / "gallery" / f)) for f, k in keys.items()]
            assert jobs.add_artifacts(job.id, items, attempt=attempt)
            jobs.finish(job.id, attempt, "succeeded")
            proc, base = start_gateway(env, tmp / "gateway.log")
            try:
                client = httpx.Client(base_url=base, timeout=120)
                rss_before = rss_mb(proc.pid)
                cold, overview = timed_get(client, f"/v1/jobs/{job.id}/clusters")
                first_pages = []
                for c in range(args.clusters):
                    t, page = timed_get(client, f"/v1/jobs/{job.id}/clusters/{c}/images?offset=0&limit=48")
                    assert len(page["items"]) == min(48, page["total"])
                    first_pages.append(t)
                deep = [timed_get(client, f"/v1/jobs/{job.id}/clusters/{c}/images?offset=2400&limit=48")[0]
                        for c in range(args.clusters)]
                again = [timed_get(client, f"/v1/jobs/{job.id}/clusters/{c}/images?offset=0&limit=48")[0]
                         for c in range(args.clusters)]
                neighbours = [timed_get(client, f"/v1/jobs/{job.id}/images/{i}")[0] for i in range(0, n, n // 10)]
                body = client.get(f"/v1/jobs/{job.id}/clusters/0/images?offset=0&limit=48").content
                figures = {
                    "images": n,
                    "clusters": args.clusters,
                    "decode_s": round(decoded_s, 1),
                    "gallery_write_s": round(write_s, 2),
                    "gallery_bytes": sizes,
                    "first_request_s (download + open + clusters with prototypes)": round(cold, 3),
                    "first_page_s (48 thumbnails, none cached): median / max": [
                        round(statistics.median(first_pages), 3), round(max(first_pages), 3)],
                    "deep_page_s (offset 2400): median / max": [round(statistics.median(deep), 3), round(max(deep), 3)],
                    "repeat_page_s (thumbnails cached): median / max": [
                        round(statistics.median(again), 3), round(max(again), 3)],
                    "image_with_neighbours_s: median / max": [
                        round(statistics.median(neighbours), 3), round(max(neighbours), 3)],
                    "page_bytes": len(body),
                    "gateway_rss_mb": [round(rss_before, 1), round(rss_mb(proc.pid), 1)],
                    "cluster_sizes": [c["size"] for c in overview["clusters"]],
                }
            finally:
                stop(proc)
                jobs.dispose()
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
