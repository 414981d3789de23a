"""Benchmark on digits and mnist5k: the `cpu` preset for several seeds against k-means on pixels.

    python bench/small_datasets.py [--datasets digits mnist5k] [--seeds 0 1 2] [--out bench/out/small]

Writes one JSON line per run to OUT/results.jsonl and prints a summary table (mean ACC/NMI/ARI and
wall time per seed). Run it on a quiet machine: timings are part of the result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kmeans_pixels import kmeans_pixels


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", nargs="+", default=["digits", "mnist5k"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("bench/out/small"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting over the preset, passed to every run (repeatable)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    summary = {}
    for ds in args.datasets:
        base = kmeans_pixels(ds)
        with results.open("a") as f:
            f.write(json.dumps(base) + "\n")
        runs = []
        for seed in args.seeds:
            out = args.out / f"{ds}-seed{seed}"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "nnm.cli.main", "pipeline", "--dataset", ds, "--preset", args.preset,
                            "--seed", str(seed), "--quiet", "--out", str(out),
                            *[a for kv in args.set for a in ("--set", kv)]], check=True)
            wall = time.perf_counter() - t0
            m = json.loads((out / "metrics.json").read_text())
            row = {"dataset": ds, "seed": seed, "preset": args.preset, "set": args.set, "acc": m["acc"],
                   "nmi": m["nmi"], "ari": m["ari"], "wall_s": round(wall, 1), "final_stage": m.get("final_stage"),
                   "neighbor_accuracy": m.get("neighbor_accuracy"), "selflabel_guard": m.get("selflabel_guard"),
                   "timings": m["timings"]}
            runs.append(row)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
        summary[ds] = {
            "kmeans_pixels": {k: round(base[k], 4) for k in ("acc", "nmi", "ari")},
            "acc_mean": round(statistics.mean(r["acc"] for r in runs), 4),
            "acc_per_seed": [round(r["acc"], 4) for r in runs],
            "nmi_mean": round(statistics.mean(r["nmi"] for r in runs), 4),
            "ari_mean": round(statistics.mean(r["ari"] for r in runs), 4),
            "wall_s_per_seed": [r["wall_s"] for r in runs],
        }
    print(json.dumps(summary, indent=2))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
