"""Neighbour mining at scale: time and peak memory of `nnm.engine.mining.knn` against one raw faiss call.

    .venv/bin/python bench/mining.py exact --n 200000      # knn (exact, chunked) vs IndexFlatIP.search once
    .venv/bin/python bench/mining.py approx --n 1000000    # knn(index="ivf"): time, memory, recall@20
    .venv/bin/python bench/mining.py nearest --n 200000    # nearest_other (NNM's global memory): exact vs ivf

Every case runs in a fresh process of its own, so its peak resident memory (VmHWM) is its own; memory
is reported above the features (the process after generating them) and in all. Features are
synthetic, L2-normalised 512-d points around 1,000 random centres (real pretext features have such
clusters, and random uniform points have none for an index to use); recall@20 of an approximate
search is measured against exact search on a random sample of rows. Prints one JSON line per case.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def _status(field: str) -> int:
    """A VmRSS / VmHWM line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def features(n: int, d: int, centers: int = 1000, seed: int = 0):
    """n clustered, L2-normalised float32 points, generated in blocks (no temporary of the whole size)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d), dtype=np.float32)
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 65536):
        stop = min(n, start + 65536)
        noise = rng.standard_normal((stop - start, d), dtype=np.float32)
        block = c[rng.integers(0, centers, stop - start)] + 0.35 * noise
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def run_case(case: str, n: int, d: int, k: int, sample: int, params: dict) -> dict:
    # Every import before the clock and the memory baseline: torch alone is ~0.7 GB and seconds.
    import faiss
    import numpy as np
    from nnm.engine.mining import exact_rows, knn, nearest_other, recall_at_k

    x = features(n, d)
    base = _status("VmRSS")
    started = time.perf_counter()
    result: dict = {"case": case, "n": n, "d": d, "k": k}
    if case == "raw-faiss":
        index = faiss.IndexFlatIP(d)
        index.add(x)
        index.search(x, k + 2)
    elif case == "knn-exact":
        knn(x, k)
    elif case.startswith("nearest-"):
        import torch

        found = nearest_other(torch.from_numpy(x), index=case.removeprefix("nearest-"))
        result["seconds"] = time.perf_counter() - started
        result["peak_before_check"] = _status("VmHWM")
        # Against the exact answer on a sample of rows: same row found, and how much farther when not.
        rows = torch.from_numpy(np.random.default_rng(1).choice(n, sample, replace=False))
        xt = torch.from_numpy(x)
        best, got = torch.empty(sample), torch.empty(sample)
        for start in range(0, sample, 100):
            part = rows[start : start + 100]
            dist = torch.cdist(xt[part], xt)
            dist[torch.arange(len(part)), part] = float("inf")
            best[start : start + 100] = dist.min(dim=1).values
            got[start : start + 100] = dist[torch.arange(len(part)), torch.from_numpy(found[part.numpy()])]
        result["same_as_exact"] = float((got == best).float().mean())
        ratio = got / best.clamp_min(1e-12)
        result["distance_ratio_p50_p99"] = [float(ratio.median()), float(ratio.quantile(0.99))]
        result["sample"] = sample
    else:
        idx, _ = knn(x, k, index=case.removeprefix("knn-"), index_params=params)
        result["seconds"] = time.perf_counter() - started
        rows = np.random.default_rng(1).choice(n, sample, replace=False)
        t0 = time.perf_counter()
        result["recall_at_k"] = recall_at_k(idx[rows], exact_rows(x, rows, k))
        result["recall_sample"] = sample
        result["seconds_recall_reference"] = time.perf_counter() - t0
        result["params"] = params
    result.setdefault("seconds", time.perf_counter() - started)
    peak = result.pop("peak_before_check", None) or _status("VmHWM")
    result.update(features_gib=x.nbytes / 2**30, peak_gib=peak / 2**30, peak_above_features_gib=(peak - base) / 2**30)
    return result


def in_child(case: str, args: argparse.Namespace, params: dict) -> dict:
    cmd = [sys.executable, __file__, "_case", case, "--n", str(args.n), "--d", str(args.d), "--k", str(args.k),
           "--sample", str(args.sample), "--params", json.dumps(params)]
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> dict:
    import faiss
    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    return {"cpu": model, "cores": os.cpu_count(), "amx": "amx_tile" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "faiss": faiss.__version__, "torch": torch.__version__}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["exact", "approx", "nearest", "_case"])
    p.add_argument("case", nargs="?")
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--sample", type=int, default=2000, help="rows whose exact neighbours measure recall")
    p.add_argument("--index", default="ivf", choices=["ivf", "hnsw"])
    p.add_argument("--params", default="{}", help="JSON index_params for the approximate index")
    args = p.parse_args()
    if args.mode == "_case":
        print(json.dumps(run_case(args.case, args.n, args.d, args.k, args.sample, json.loads(args.params))))
        return
    print(json.dumps({"machine": machine()}), flush=True)
    if args.mode == "exact":
        raw = in_child("raw-faiss", args, {})
        print(json.dumps(raw), flush=True)
        ours = in_child("knn-exact", args, {})
        ours["ratio_to_raw_faiss"] = ours["seconds"] / raw["seconds"]
        print(json.dumps(ours), flush=True)
    elif args.mode == "nearest":
        for case in ("nearest-exact", "nearest-ivf"):
            print(json.dumps(in_child(case, args, {})), flush=True)
    else:
        print(json.dumps(in_child(f"knn-{args.index}", args, json.loads(args.params))), flush=True)


if __name__ == "__main__":
    main()
