#!/usr/bin/env bash
# Trains one model (resuming from its checkpoints) and ships its final model once: the
# step the zoo jobs (scripts/paper_zoo.sh, scripts/paper_gap_zoo.sh) share.
#
#   bash scripts/train_and_ship.sh NAME CONFIG WORKDIR SHIPPED MAX_HOURS [TRAIN FLAGS...]
#
# A model already at SHIPPED (its model.json) is left as it is; otherwise
# scripts/train.py --config=CONFIG --workdir=WORKDIR --config.max_hours=MAX_HOURS runs
# (its train set extracted first unless a flag sets --config.dataset), and the final
# model is copied to SHIPPED, with its card in WORKDIR/card.md. Exits 3, with the
# checkpoint kept, when the training cannot end within MAX_HOURS on this host.
# Environment: PYTHON [.venv/bin/python].
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ $# -ge 5 ] || { sed -n 5p "$0" | sed 's/^# *//' >&2; exit 2; }
name=$1 config=$2 workdir=$3 shipped=$4 hours=$5
shift 5

if [ -f "$shipped/model.json" ]; then
  echo "$name: shipped at $shipped"
  exit 0
fi
if [ ! -f "$workdir/model/model.json" ]; then
  echo "$name: training in $workdir (resumes from its checkpoints)"
  if [[ " $* " != *" --config.dataset="* ]]; then
    bash scripts/prepare_cifar10_jpeg.sh  # the recipes' train set, runs/data/cifar10-jpeg
  fi
  "$PYTHON" scripts/train.py --config="$config" --workdir="$workdir" \
    --config.max_hours="$hours" "$@"  # exits 3 when it cannot end within the hours
fi
mkdir -p "$(dirname "$shipped")"
rm -rf "$shipped.partial"
cp -r "$workdir/model" "$shipped.partial"
mv "$shipped.partial" "$shipped"
"$PYTHON" scripts/model_card.py "$shipped" > "$workdir/card.md"
echo "$name: shipped to $shipped; model card in $workdir/card.md"
