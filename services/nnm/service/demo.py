"""The main job, end to end through the REST API on embedded defaults:

start `nnm serve` (SQLite, local files, in-process workers), register scikit-learn's digits, run the
whole pipeline as a job while showing its progress, print the metrics, save the confusion matrix and
the prototypes, and assign a few images through the API.

    python -m nnm.service.demo [--out runs/demo] [--dataset digits] [--preset cpu]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _progress_line(job: dict) -> str:
    p = job.get("progress") or {}
    stage = p.get("stage") or job.get("stage") or "-"
    parts = [f"{job['status']:<10}", f"stage {stage:<9}"]
    if p.get("epochs"):
        parts.append(f"epoch {p.get('epoch', 0)}/{p['epochs']}")
    if p.get("loss") is not None:
        parts.append(f"loss {p['loss']:.3f}")
    if p.get("images_per_s"):
        parts.append(f"{p['images_per_s']:.0f} img/s")
    if p.get("fraction") is not None:
        parts.append(f"{100 * p['fraction']:5.1f}% of stage")
    return "  ".join(parts)


def sample_images(count: int = 5) -> list[tuple[str, bytes]]:
    """The last `count` scikit-learn digits as PNG files (named after their true digit)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    out = []
    for i in range(1, count + 1):
        buf = io.BytesIO()
        Image.fromarray((d.images[-i] * 255 / 16).astype(np.uint8)).save(buf, format="PNG")
        out.append((f"digit-{d.target[-i]}-{i}.png", buf.getvalue()))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/demo"))
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--preset", default="cpu")
    args = ap.parse_args(argv)
    from .client import Client

    args.out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNM_")}
    log_path = args.out / "service.log"
    with open(log_path, "ab") as log:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nnm.cli.main",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(args.out / "service"),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    client = Client(f"http://127.0.0.1:{port}", timeout=300)
    try:
        client.wait_ready(120)
        print(f"service ready on http://127.0.0.1:{port} (docs at /docs)")
        dataset = client.builtin_dataset(args.dataset)
        print(f"dataset {dataset['id']}: {dataset['image_count']} images, {len(dataset['classes'] or [])} classes")
        job = client.submit("pipeline", dataset["id"], {"preset": args.preset})
        print(f"job {job['id']} queued; polling GET /v1/jobs/{job['id']}")
        started = time.monotonic()
        last = ""

        def show(j: dict) -> None:
            nonlocal last
            line = f"[{time.monotonic() - started:6.0f}s] {_progress_line(j)}"
            if line != last:
                print("\r" + line.ljust(110), end="", flush=True)
                last = line

        final = client.wait(job["id"], timeout=4 * 3600, poll_s=1.0, on_update=show)
        print()
        if final["status"] != "succeeded":
            print(f"job {final['status']}: {json.dumps(final.get('error'))}", file=sys.stderr)
            return 1
        m = final["metrics"]
        print("metrics: " + "  ".join(f"{k} {m[k]:.4f}" for k in ("acc", "nmi", "ari", "top5") if k in m))
        for name in ("confusion_matrix.png", "prototypes.png", "metrics.json"):
            (args.out / name).write_bytes(client.artifact(final["id"], name))
        print(f"saved {args.out / 'confusion_matrix.png'}, {args.out / 'prototypes.png'}, {args.out / 'metrics.json'}")
        print(f"model {final['model_id']}: assigning {len(sample_images())} images through the API")
        for r in client.assign(final["model_id"], sample_images()):
            print(
                f"  {r['filename']:<16} -> cluster {r['cluster']}  (class {r.get('class_name')}, "
                f"confidence {r['confidence']:.3f})"
            )
        return 0
    finally:
        client.close()
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
