#!/usr/bin/env bash
# CIFAR-10 benchmark on 2 CPU cores: train the `cpu` preset on 45,000 training images of a zip with
# train/ and test/ folders; the pipeline reports the 5,000 held out (500 per class) as its headline, which
# `nnm evaluate` on the held-out zip checks; k-means on raw pixels of the same held-out images is the
# baseline. Usage: bash bench/cifar10_holdout.sh [OUT_DIR] [extra nnm pipeline args...]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/out/cifar10}; shift || true
SRC=${CIFAR10_ZIP:-../shared/data/cifar10-train-jpg.zip}
mkdir -p "$OUT"
.venv/bin/python bench/split_cifar10.py "$SRC" "$OUT/data" > /dev/null
SPLIT="$OUT/data/cifar10-split.zip"; HOLD="$OUT/data/cifar10-holdout5k.zip"
start=$(date +%s)
.venv/bin/nnm pipeline --dataset "$SPLIT" --preset cpu --seed 0 --quiet --out "$OUT/run" "$@"
train_s=$(( $(date +%s) - start ))
.venv/bin/nnm evaluate --model "$OUT/run" --dataset "$HOLD" --out "$OUT/holdout" --quiet
.venv/bin/python bench/kmeans_pixels.py "$HOLD" > "$OUT/kmeans_holdout.json"
.venv/bin/python - "$OUT" "$train_s" <<'PY'
import json, sys
out, train_s = sys.argv[1], int(sys.argv[2])
run = json.load(open(f"{out}/run/metrics.json"))
hold = json.load(open(f"{out}/holdout/metrics.json"))
km = json.load(open(f"{out}/kmeans_holdout.json"))
assert run["evaluated_on"] == "test" and abs(run["acc"] - hold["acc"]) < 1e-9, (run["acc"], hold["acc"])
summary = {"train_wall_s": train_s, "train_split": {k: run["train"][k] for k in ("acc", "nmi", "ari")},
           "holdout": {k: hold[k] for k in ("acc", "nmi", "ari")},
           "kmeans_pixels_holdout": {k: km[k] for k in ("acc", "nmi", "ari")}, "timings": run["timings"],
           "neighbor_accuracy": run.get("neighbor_accuracy"), "final_stage": run.get("final_stage"),
           "selflabel": {k: run.get(k) for k in ("selflabel_kept", "selflabel_guard")}}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
print(json.dumps(summary, indent=2))
PY
