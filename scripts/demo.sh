#!/usr/bin/env bash
# The main job on a fresh machine, on embedded defaults (no server to install): starts the service,
# runs the whole pipeline on scikit-learn's digits (real 8x8 scans of handwritten digits) as a job over
# HTTP, prints its metrics, saves the confusion matrix and prototypes, and assigns a few images.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m nnm.service.demo --out "${1:-runs/demo}"
