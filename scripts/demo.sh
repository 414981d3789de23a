#!/usr/bin/env bash
# The main job on a fresh machine: the whole pipeline on scikit-learn's digits (real 8x8 scans of
# handwritten digits, shipped with scikit-learn), then cluster assignment of a few new images.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${1:-runs/digits}
.venv/bin/nnm pipeline --dataset digits --preset cpu --out "$OUT"
mkdir -p "$OUT/samples"
.venv/bin/python - "$OUT/samples" <<'PY'
import sys
from PIL import Image
from sklearn.datasets import load_digits
d = load_digits()
for i in range(5):
    Image.fromarray((d.images[-1 - i] * 255 / 16).astype("uint8")).save(f"{sys.argv[1]}/digit-{d.target[-1 - i]}.png")
PY
echo "Assigning five images to the learnt clusters:"
.venv/bin/nnm assign --model "$OUT" "$OUT"/samples/*.png
echo "Confusion matrix: $OUT/confusion_matrix.png   prototypes: $OUT/prototypes.png   model: $OUT/model"
