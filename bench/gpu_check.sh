#!/usr/bin/env bash
# One prepared run for a lent GPU machine (see docs/benchmarks.md):
#   1. the CIFAR-10 paper presets (NNM and SCAN) for a few epochs: seconds per SimCLR / cluster epoch;
#   2. the CPU preset and variants of it, replayed on the GPU to compare held-out accuracy quickly.
# Env: DEVICE (cuda), SRC_ZIP (CIFAR-10 JPEG zip), OUT (results), TINY=1 for a local dry run.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}
SRC_ZIP=${SRC_ZIP:-.device/cifar10-train-jpg.zip}
LOG="$OUT/log.txt"; SUMMARY="$OUT/summary.jsonl"
if [ -d .whl ] && ! python3 -c "import pydantic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/services${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
NNM="$PY -m nnm.cli.main"
DATA=/tmp/cifar-split
$PY bench/split_cifar10.py "$SRC_ZIP" $DATA --per-class ${PER_CLASS:-500} >>"$LOG" 2>&1 || { echo "split failed"; tail "$LOG"; exit 1; }
TRAIN=$(ls $DATA/cifar10-train*.zip); HOLD=$(ls $DATA/cifar10-holdout*.zip)
(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi") | tee -a "$LOG"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())" | tee -a "$LOG"

TINY_SETS=()
if [ "${TINY:-0}" = 1 ]; then
  TINY_SETS=(--set pretext.epochs=1 --set cluster.epochs=1 --set selflabel.epochs=1 --set pretext.batch_size=64
             --set cluster.batch_size=32 --set selflabel.batch_size=32)
fi

record() {  # name, out dir, seconds, holdout dir
  $PY - "$@" <<'PY' >>"$SUMMARY" 2>>"$LOG"
import json, sys
name, out, secs, hold = sys.argv[1:5]
m = json.load(open(f"{out}/metrics.json"))
h = json.load(open(f"{hold}/metrics.json")) if hold != "-" else {}
print(json.dumps({"name": name, "wall_s": int(secs), "train_acc": m.get("acc"), "holdout_acc": h.get("acc"),
                  "holdout_nmi": h.get("nmi"), "holdout_ari": h.get("ari"),
                  "neighbor_acc": m.get("neighbor_accuracy"), "timings": m.get("timings")}))
PY
  tail -n 1 "$SUMMARY"
}

reuse() {  # copy finished stage directories of an earlier run: out dirs...
  local out=$1; shift; mkdir -p "$out"
  for d in "$@"; do [ -d "$d" ] && cp -r "$d" "$out/"; done
}

run_paper() {  # name preset [stage dirs to reuse...]
  local name=$1 preset=$2; shift 2; local out=/tmp/run-$name; local t0=$SECONDS
  reuse $out "$@"
  timeout ${PAPER_LIMIT:-120} $NNM pipeline --dataset "$TRAIN" --preset $preset --device $DEVICE --quiet --out $out \
    --set pretext.epochs=2 --set cluster.epochs=2 --set selflabel.epochs=1 "${TINY_SETS[@]}" >>"$LOG" 2>&1 \
    && record $name $out $((SECONDS - t0)) - || echo "{\"name\": \"$name\", \"failed\": true}" | tee -a "$SUMMARY"
}

run_variant() {  # name limit sets...   (REUSE="dirs" copies finished stages first)
  local name=$1 limit=$2; shift 2; local out=/tmp/run-$name; local t0=$SECONDS
  reuse $out ${REUSE:-}
  local sets=(); for s in "$@"; do sets+=(--set "$s"); done
  timeout $limit $NNM pipeline --dataset "$TRAIN" --preset cpu --device $DEVICE --quiet --out $out \
      "${sets[@]}" "${TINY_SETS[@]}" >>"$LOG" 2>&1 \
    && timeout 60 $NNM evaluate --model $out --dataset "$HOLD" --device $DEVICE --out $out/holdout --quiet >>"$LOG" 2>&1 \
    && record $name $out $((SECONDS - t0)) $out/holdout || echo "{\"name\": \"$name\", \"failed\": true}" | tee -a "$SUMMARY"
}

run_paper paper-nnm nnm
run_variant cpu-w16-e25 150
run_paper paper-scan scan /tmp/run-paper-nnm/pretext /tmp/run-paper-nnm/mine
REUSE=/tmp/run-cpu-w16-e25/pretext run_variant cpu-w16-e25-bbmine 100 mine.feature=backbone
run_variant cpu-w32-e12 150 pretext.backbone.width=32 pretext.epochs=12
run_variant cpu-w16-e50 200 pretext.epochs=50
echo "done" | tee -a "$LOG"
