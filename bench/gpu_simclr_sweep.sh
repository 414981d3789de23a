#!/usr/bin/env bash
# Short SimCLR sweep on a lent GPU: neighbour accuracy of the CPU preset's backbone (w16) after a few
# epochs, for several temperatures / batch sizes. Used to choose the CPU preset's settings.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/sweep-out}; mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import pydantic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/services${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}; DEVICE=${DEVICE:-cuda}; EPOCHS=${EPOCHS:-15}
$PY bench/split_cifar10.py "${SRC_ZIP:-.device/cifar10-train-jpg.zip}" /tmp/split >/dev/null
TRAIN=/tmp/split/cifar10-train45k.zip
variant() {  # name sets...
  local name=$1; shift; local sets=(); for s in "$@"; do sets+=(--set "$s"); done
  local t0=$SECONDS
  $PY -m nnm.cli.main pretext --dataset $TRAIN --preset cpu --device $DEVICE --quiet --out /tmp/p-$name \
     --set pretext.epochs=$EPOCHS "${sets[@]}" > /dev/null 2>>"$OUT/log.txt" &&
  $PY -m nnm.cli.main mine --dataset $TRAIN --preset cpu --device $DEVICE --quiet --pretext /tmp/p-$name \
     --out /tmp/m-$name > /dev/null 2>>"$OUT/log.txt" &&
  $PY -c "import json,sys; m=json.load(open('/tmp/m-$name/metrics.json')); print(json.dumps({'name': '$name', 'secs': $((SECONDS - t0)), 'nb_acc': m['neighbor_accuracy']}))" | tee -a "$OUT/sweep.jsonl"
}
variant t01-b512 pretext.temperature=0.1
variant t02-b512 pretext.temperature=0.2
variant t05-b512 pretext.temperature=0.5
variant t02-b256 pretext.temperature=0.2 pretext.batch_size=256 pretext.lr=0.3
echo done
