"""Benchmark of `--clusters auto`: the estimated K, the accuracy with it, and what the estimate costs.

    python bench/estimate_k.py [--datasets digits mnist5k] [--seeds 0 1 2] [--out bench/out/estimate]

For each dataset and seed it runs `nnm pipeline --clusters auto` (the preset's criterion), then scores
the other criteria on the same run's pretext model and mined neighbours (a comparison only: labels are
never used by any criterion, only to score the runs). One JSON line per run goes to OUT/results.jsonl;
a summary table is printed. Timings are part of the result: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def compare_criteria(run: Path, dataset: str, seed: int, k_max: int) -> dict[str, dict]:
    """Estimate K on a finished run's outputs with every criterion and graph size (labels unused)."""
    from nnm.engine.config import RuntimeConfig
    from nnm.engine.data import load_dataset
    from nnm.engine.estimate import (
        choose_k,
        eigengap_estimate,
        kmeans_partitions,
        modularity_estimate,
        silhouette_estimate,
    )
    from nnm.engine.runtime import Runtime
    from nnm.engine.stages.estimate import mined_feature
    from nnm.engine.stages.mine import pretext_features

    cfg = json.loads((run / "config.json").read_text())
    neighbors = np.load(run / "mine" / "neighbors.npy")
    data = load_dataset(dataset, cfg["data"]["split"], cfg["data"]["image_size"], cfg["data"]["root"])
    rt = Runtime(RuntimeConfig.model_validate(cfg["runtime"]))
    features = pretext_features(run / "pretext", data, rt, mined_feature(run / "mine"))[0].numpy()
    t0 = time.perf_counter()
    parts = dict(kmeans_partitions(features, range(2, k_max + 1), seed))  # one fit scores both criteria
    kmeans_s = time.perf_counter() - t0
    out: dict[str, dict] = {"kmeans": {"seconds": round(kmeans_s, 2)}}
    runs = [(f"eigengap-{k}nn", lambda k=k: eigengap_estimate(neighbors, 2, k_max, k, seed)) for k in (5, 10, 20)
            if k < neighbors.shape[1]]
    runs += [("modularity", lambda: modularity_estimate(features, neighbors, 2, k_max, None, seed, parts)),
             ("silhouette", lambda: silhouette_estimate(features, 2, k_max, 4000, seed, parts))]
    for name, fn in runs:
        t0 = time.perf_counter()
        est = fn()
        out[name] = {"k": est.k, "seconds": round(time.perf_counter() - t0, 2),
                     "top3": sorted(est.curve, key=est.curve.get, reverse=True)[:3]}
        if est.standard_error is not None:  # what each rule for a flat top would choose on this curve
            best = est.best_scoring
            out[name] |= {"standard_error_at_best": round(est.standard_error[best], 5),
                          "k_two_standard_errors": choose_k(est.curve, est.standard_error, None, 2.0)[0],
                          "k_one_standard_error": choose_k(est.curve, est.standard_error, None, 1.0)[0],
                          "k_tolerance_0.01": choose_k(est.curve, est.standard_error, 0.01)[0]}
    return out


def one_to_one_accuracy(run: Path) -> float:
    """ACC with a one-to-one (Hungarian) matching whatever K is: with more clusters than classes, the
    images of the unmatched clusters count as wrong (`metrics.json` then matches many-to-one)."""
    import csv

    from nnm.engine.metrics import accuracy_after_matching
    from scipy.optimize import linear_sum_assignment

    with open(run / "assignments.csv") as f:
        rows = list(csv.DictReader(f))
    pred = np.array([int(r["cluster"]) for r in rows])
    names = sorted({r["label"] for r in rows})
    target = np.array([names.index(r["label"]) for r in rows])
    counts = np.zeros((pred.max() + 1, len(names)), dtype=np.int64)
    np.add.at(counts, (pred, target), 1)
    r, c = linear_sum_assignment(-counts)
    mapping = np.full(len(counts), -1)
    mapping[r] = c
    return accuracy_after_matching(pred, target, mapping)


def estimate_only(dataset: str, seed: int, preset: str, settings: list[str], out: Path) -> dict:
    """Pretext, mine and estimate through the engine library (what `nnm pipeline` runs before clustering)."""
    from nnm.engine.checkpoint import atomic_write_json
    from nnm.engine.config import apply_override
    from nnm.engine.pipeline import resolve_config
    from nnm.engine.stages import run_estimate, run_mine, run_pretext

    overrides: dict = {}
    for kv in [*settings, f"runtime.seed={seed}", 'cluster.clusters="auto"']:
        apply_override(overrides, kv)
    cfg = resolve_config(dataset, preset, overrides)
    out.mkdir(parents=True, exist_ok=True)
    # A finished `nnm pipeline` run in `out` (same dataset, seed and preset) lends its pretext model and
    # neighbours (their stages resume); its own config.json is kept.
    if not (out / "config.json").exists():
        atomic_write_json(out / "config.json", cfg.model_dump(mode="json"))
    from nnm.engine.data import load_dataset

    data = load_dataset(dataset, cfg.data.split, cfg.data.image_size, cfg.data.root)
    rt = cfg.runtime
    pre = run_pretext(cfg.pretext, data, out / "pretext", rt)
    mine = run_mine(cfg.mine, data, out / "pretext", out / "mine", rt)
    est = run_estimate(cfg.estimate, data, out / "pretext", out / "mine", out / "estimate", rt)
    return {"dataset": dataset, "seed": seed, "preset": preset, "set": settings, "k": est["clusters"],
            "criterion": est["criterion"], "num_classes": est.get("num_classes"), "max_clusters": est["max_clusters"],
            "estimate_s": est["seconds"], "pretext_s": round(sum(h["seconds"] for h in pre["history"]), 1),
            "neighbor_accuracy": mine.get("neighbor_accuracy")}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", nargs="+", default=["digits", "mnist5k"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("bench/out/estimate"))
    ap.add_argument("--no-compare", action="store_true", help="skip the other criteria")
    ap.add_argument("--estimate-only", action="store_true",
                    help="run only pretext, mine and the estimate (no clustering: K without ACC, for time)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    summary = {}
    for ds in args.datasets:
        runs = []
        for seed in args.seeds:
            # A data set given as a path is named by its file (an absolute path would escape OUT).
            out = args.out / f"{Path(ds).name}-seed{seed}"
            t0 = time.perf_counter()
            if args.estimate_only:
                row = estimate_only(ds, seed, args.preset, args.set, out)
                row["wall_s"] = round(time.perf_counter() - t0, 1)
                if not args.no_compare:
                    row["criteria"] = compare_criteria(out, ds, seed, row["max_clusters"])
                runs.append(row)
                with results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
                continue
            subprocess.run([sys.executable, "-m", "nnm.cli.main", "pipeline", "--dataset", ds, "--preset", args.preset,
                            "--seed", str(seed), "--clusters", "auto", "--quiet", "--out", str(out),
                            *[a for kv in args.set for a in ("--set", kv)]], check=True)
            wall = time.perf_counter() - t0
            m = json.loads((out / "metrics.json").read_text())
            est = json.loads((out / "estimate" / "estimate.json").read_text())
            t = m["timings"]
            # A run with K given runs the same stages minus the estimate. Summed from the stages' own
            # times, so that a resumed run (stages done earlier) gives the same ratio.
            stages = sum(v["seconds"] for v in t.values() if isinstance(v, dict))
            ratio = stages / (stages - t["estimate"]["seconds"])
            row = {"dataset": ds, "seed": seed, "preset": args.preset, "set": args.set, "k": est["clusters"],
                   "criterion": est["criterion"], "num_classes": est.get("num_classes"),
                   "acc": m["acc"], "matching": m.get("matching"), "acc_one_to_one": one_to_one_accuracy(out),
                   "nmi": m["nmi"], "ari": m["ari"], "wall_s": round(wall, 1),
                   "estimate_s": t["estimate"]["seconds"], "cost_ratio": round(ratio, 4),
                   "neighbor_accuracy": m.get("neighbor_accuracy"), "timings": t}
            if not args.no_compare:
                row["criteria"] = compare_criteria(out, ds, seed, est["max_clusters"])
            runs.append(row)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
        if args.estimate_only:
            summary[ds] = {"k_per_seed": [r["k"] for r in runs], "estimate_s": [r["estimate_s"] for r in runs],
                           "wall_s": [r["wall_s"] for r in runs]}
            continue
        summary[ds] = {
            "k_per_seed": [r["k"] for r in runs],
            "acc_per_seed": [round(r["acc"], 4) for r in runs],
            "acc_mean": round(statistics.mean(r["acc"] for r in runs), 4),
            "acc_one_to_one_per_seed": [round(r["acc_one_to_one"], 4) for r in runs],
            "nmi_mean": round(statistics.mean(r["nmi"] for r in runs), 4),
            "ari_mean": round(statistics.mean(r["ari"] for r in runs), 4),
            "estimate_s": [r["estimate_s"] for r in runs],
            "cost_ratio_max": max(r["cost_ratio"] for r in runs),
            "wall_s": [r["wall_s"] for r in runs],
        }
    print(json.dumps(summary, indent=2))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
