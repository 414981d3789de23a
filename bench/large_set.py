"""Data sets larger than memory: the decoded-image cache's build rate and the memory of reading from it.

    .venv/bin/python bench/large_set.py make --n 1000000 --out /tmp/large/cifar-1m.zip
    .venv/bin/python bench/large_set.py cache --data /tmp/large/cifar-1m.zip --cache-dir /tmp/large/cache
    .venv/bin/python bench/large_set.py pipeline --data SET.zip --cache-dir DIR [--set KEY=VALUE ...]

`make` writes N JPEGs of 32 px (random crops of 50-100 % of the area and flips of the CIFAR-10 training
JPEGs in ../shared/data, in their class folders) into a zip. `cache` runs, each in a fresh process with
its own peak resident memory (VmHWM): decoding the set into memory (the baseline: what every load did
before the cache), building the cache, opening the built cache, and one training epoch's worth of
shuffled batches of 512 gathered from it. `pipeline` runs `nnm pipeline` on the set with the cache on
and samples the resident memory of its process. Prints one JSON line per case; delete the zip and the
cache directory afterwards (several GB at 1,000,000 images).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import subprocess
import sys
import time
import zipfile
from pathlib import Path

SHARED_ZIP = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-train-jpg.zip"


def _status(field: str, pid: str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    return {"cpu": model, "cores": os.cpu_count(), "amx": "amx_tile" in flags, "avx512_bf16": "avx512_bf16" in flags}


def _sources():
    import numpy as np
    from PIL import Image

    images, labels, classes = [], [], []
    with zipfile.ZipFile(SHARED_ZIP) as z:
        for name in sorted(n for n in z.namelist() if n.endswith(".jpg")):
            cls = name.split("/")[-2]
            if cls not in classes:
                classes.append(cls)
            images.append(np.asarray(Image.open(io.BytesIO(z.read(name))).convert("RGB")))
            labels.append(classes.index(cls))
    return np.stack(images), np.asarray(labels), classes


def _make_chunk(args: tuple[int, int, int]) -> list[tuple[str, bytes]]:
    from PIL import Image

    start, count, seed = args
    import numpy as np

    images, labels, classes = _SOURCES
    rng = np.random.default_rng(seed)
    out = []
    for i in range(start, start + count):
        j = int(rng.integers(len(images)))
        side = round(32 * float(np.sqrt(rng.uniform(0.5, 1.0))))
        x, y = (int(v) for v in rng.integers(0, 32 - side + 1, 2))
        img = Image.fromarray(images[j][y : y + side, x : x + side]).resize((32, 32), Image.BILINEAR)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append((f"{classes[labels[j]]}/{i:07d}.jpg", buf.getvalue()))
    return out


_SOURCES = None


def _init_sources() -> None:
    global _SOURCES
    _SOURCES = _sources()


def make(n: int, out: Path) -> dict:
    import multiprocessing as mp

    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    chunk = 10_000
    jobs = [(s, min(chunk, n - s), s) for s in range(0, n, chunk)]
    with mp.get_context("fork").Pool(os.cpu_count() or 2, initializer=_init_sources) as pool, \
            zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for members in pool.imap(_make_chunk, jobs):
            for name, data in members:
                z.writestr(name, data)
    return {"case": "make", "images": n, "seconds": round(time.perf_counter() - t0, 1),
            "zip_bytes": out.stat().st_size}


def _child(case: str, data: str, cache_dir: str) -> dict:
    """One case in this (fresh) process."""
    import torch
    from nnm.engine.cache import CachePolicy, MappedImages
    from nnm.engine.data import load_dataset

    base = _status("VmRSS")
    t0 = time.perf_counter()
    policy = None if case == "memory" else CachePolicy(Path(cache_dir))
    loaded = load_dataset(data, cache=policy)
    row: dict = {"case": case, "images": len(loaded), "shape": list(loaded.images.shape),
                 "mapped": isinstance(loaded.images, MappedImages), "load_seconds": round(time.perf_counter() - t0, 1)}
    row["images_per_s"] = round(len(loaded) / row["load_seconds"]) if row["load_seconds"] else None
    if case == "epoch":
        t1 = time.perf_counter()
        gen = torch.Generator().manual_seed(0)
        total = 0
        for idx in torch.randperm(len(loaded), generator=gen).split(512):
            total += int(loaded.images[idx][:, :, 0, 0].sum())  # the gather is the work measured
        row["epoch_seconds"] = round(time.perf_counter() - t1, 1)
        row["batches_per_s"] = round(len(loaded) / 512 / row["epoch_seconds"], 1)
    row["peak_rss_bytes"] = _status("VmHWM")
    row["rss_before_bytes"] = base
    return row


def cache(data: Path, cache_dir: Path, skip_memory: bool) -> list[dict]:
    rows = []
    cases = ([] if skip_memory else ["memory"]) + ["build", "open", "epoch"]
    for case in cases:
        proc = subprocess.run([sys.executable, __file__, "_child", case, str(data), str(cache_dir)],
                              capture_output=True, text=True, check=True)
        row = json.loads(proc.stdout.strip().splitlines()[-1]) | _machine()
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def pipeline(data: Path, cache_dir: Path, out: Path, settings: list[str]) -> dict:
    """`nnm pipeline --preset quick` with the cache on; resident memory sampled every 0.2 s."""
    cmd = [sys.executable, "-m", "nnm.cli.main", "pipeline", "--dataset", str(data), "--preset", "quick", "--quiet",
           "--out", str(out), "--set", "data.cache=on", "--set", f"data.cache_dir={cache_dir}",
           *[a for kv in settings for a in ("--set", kv)]]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        with contextlib.suppress(OSError, RuntimeError):  # the process may end between the two calls
            peak = max(peak, _status("VmRSS", str(proc.pid)))
        time.sleep(0.2)
    metrics = json.loads((out / "metrics.json").read_text()) if proc.returncode == 0 else {}
    # The kernel's own peak (no sample can miss it): the largest ru_maxrss of the processes waited for.
    peak_exact = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    row = {"case": "pipeline", "rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
           "peak_rss_sampled_bytes": peak, "peak_rss_bytes": peak_exact, "settings": settings,
           "acc": metrics.get("acc"), "timings": metrics.get("timings"),
           # The run's own record: its peak at the end of each stage (the stage that raised it set it).
           "peak_rss_bytes_after": metrics.get("memory", {}).get("peak_rss_bytes_after")} | _machine()
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        print(json.dumps(_child(*sys.argv[2:5])))
        return 0
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--n", type=int, default=1_000_000)
    m.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("cache")
    c.add_argument("--data", type=Path, required=True)
    c.add_argument("--cache-dir", type=Path, required=True)
    c.add_argument("--skip-memory", action="store_true", help="leave out the decode-into-memory baseline")
    p = sub.add_parser("pipeline")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--cache-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("bench/out/large-pipeline"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    if args.cmd == "make":
        print(json.dumps(make(args.n, args.out) | _machine()))
    elif args.cmd == "cache":
        cache(args.data, args.cache_dir, args.skip_memory)
    else:
        pipeline(args.data, args.cache_dir, args.out, args.set)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
