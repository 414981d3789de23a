#!/usr/bin/env bash
# Short SimCLR sweep: top-k neighbour accuracy of the `cpu` preset's backbone after a few epochs, for
# several temperatures, mined on backbone and on head features. Used to choose the presets' settings.
#
#   bash bench/simclr_sweep.sh                       # here, on the CPU: 1,000 images per class, 20 epochs
#   DEVICE=cuda PER_CLASS=4500 EPOCHS=15 OUT=$OUT bash bench/simclr_sweep.sh   # on a lent GPU, carry .whl/.device
#
# Env: SRC_ZIP (the CIFAR-10 JPEG zip), PER_CLASS (training images per class, at most 4,500), EPOCHS,
# TEMPS (space-separated temperatures), EXTRA (more settings for every run, e.g.
# "pretext.batch_size=256 pretext.lr=0.3"), OUT (results: sweep.jsonl, log.txt).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/out/simclr-sweep}; mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import pydantic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/services${PYTHONPATH:+:$PYTHONPATH}"
DEVICE=${DEVICE:-cpu}; EPOCHS=${EPOCHS:-20}; PER_CLASS=${PER_CLASS:-1000}; TEMPS=${TEMPS:-0.1 0.2 0.5}
PY=${PY:-python3}; [ -x .venv/bin/python ] && [ "$DEVICE" = cpu ] && PY=.venv/bin/python
WORK=${WORK:-/tmp/simclr-sweep}; mkdir -p $WORK
$PY bench/split_cifar10.py "${SRC_ZIP:-../shared/data/cifar10-train-jpg.zip}" $WORK/split >/dev/null
TRAIN=$WORK/train-$PER_CLASS.zip
$PY bench/subset_zip.py $WORK/split/cifar10-train45k.zip $TRAIN --per-folder $PER_CLASS >/dev/null
nnm() { $PY -m nnm.cli.main "$@" --dataset $TRAIN --preset cpu --device $DEVICE --quiet; }
EXTRA=${EXTRA:-}; extra=(); for s in $EXTRA; do extra+=(--set "$s"); done
for t in $TEMPS; do
  t0=$SECONDS
  rm -rf $WORK/p-$t
  nnm pretext --out $WORK/p-$t --set pretext.epochs=$EPOCHS --set pretext.temperature=$t "${extra[@]}" \
    >/dev/null 2>>"$OUT/log.txt" || exit 1
  secs=$((SECONDS - t0))
  for feature in backbone head; do
    rm -rf $WORK/m-$t-$feature
    nnm mine --pretext $WORK/p-$t --out $WORK/m-$t-$feature --set mine.feature=$feature >/dev/null 2>>"$OUT/log.txt" || exit 1
    $PY -c "import json; m = json.load(open('$WORK/m-$t-$feature/metrics.json')); print(json.dumps({'temperature': $t, 'feature': '$feature', 'epochs': $EPOCHS, 'extra': '$EXTRA', 'images': 10 * $PER_CLASS, 'pretext_s': $secs, 'neighbor_accuracy': m['neighbor_accuracy']}))" | tee -a "$OUT/sweep.jsonl"
  done
done
lscpu | grep -m1 "Model name" | tee -a "$OUT/sweep.jsonl"
