#!/usr/bin/env bash
# The paper's CIFAR-10 networks trained on this host and the paper's table run on
# them, as one job that resumes after any stop: run the same command again.
#
#   bash scripts/background.sh start runs/paper_zoo_job bash scripts/paper_zoo.sh
#
# Order (each step resumes, and a finished step costs seconds):
#   for NiN, All-CNN-C and VGG16: train with configs/train_<name>.py:$ZOO_RECIPE, ship the
#     final model to checkpoints/cifar10/<name> (once; never overwritten), then the
#     1-pixel non-targeted attack (paper preset) on 100 exact test images;
#   then NiN's other rows: the scipy preset on the same 100 images, 3 pixels (100
#     images), 1 pixel targeted at all 9 other classes (30 images; about 5x as fast per
#     query as 5 pixels: 3,346 against about 650 q/s), 5 pixels (100 images);
#   then the report of every attack run (success, confidence, target classes,
#   queries, 95% intervals) in $ZOO_RUNS/report_zoo.
# Each attack run starts from the records kept in $ZOO_RECORDS (scripts/keep_runs.py)
# when its workdir has none, so a fresh clone continues where the committed records end.
# `python scripts/keep_runs.py save docs/runs runs/zoo_*` keeps them before a commit.
#
# Environment (defaults in brackets):
#   PYTHON [.venv/bin/python]  ZOO_RUNS [runs]  ZOO_CHECKPOINTS [checkpoints/cifar10]
#   ZOO_NETWORKS ["nin allconv vgg16"]  ZOO_IMAGES [100]  ZOO_TARGETED_IMAGES [30]
#   ZOO_RECIPE [short]: the training variant, short (the cpu recipe cut to the epochs
#     that end in about two hours on 2 idle cores) or cpu (7-11 h a network)
#   ZOO_RECORDS [docs/runs]: where kept attack records are restored from
#   ZOO_MAX_TRAIN_HOURS [2.5]: the time limit of each training run: a run projected (at
#     its first log lines) to need more hours than this on this host stops with its
#     checkpoint (train.py's max_hours); the job then skips that network's attacks, goes
#     on with the rest, and exits 3 at the end. 0: no limit.
#   ZOO_TRAIN_FLAGS, ZOO_ATTACK_FLAGS: extra flags for scripts/train.py and attack.py
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
RUNS=${ZOO_RUNS:-runs}
CKPTS=${ZOO_CHECKPOINTS:-checkpoints/cifar10}
NETWORKS=${ZOO_NETWORKS:-nin allconv vgg16}
IMAGES=${ZOO_IMAGES:-100}
TARGETED_IMAGES=${ZOO_TARGETED_IMAGES:-30}
RECIPE=${ZOO_RECIPE:-short}
RECORDS=${ZOO_RECORDS:-docs/runs}
TRAIN_HOURS=${ZOO_MAX_TRAIN_HOURS:-2.5}
read -r -a TRAIN_FLAGS <<< "${ZOO_TRAIN_FLAGS:-}"
read -r -a ATTACK_FLAGS <<< "${ZOO_ATTACK_FLAGS:-}"

say() { echo "paper_zoo: $(date -u +%FT%TZ) $*"; }

case $RECIPE in
  short | cpu) ;;
  *) echo "paper_zoo: ZOO_RECIPE is '$RECIPE': expected short or cpu" >&2
     exit 2 ;;
esac
if ! [[ $TRAIN_HOURS =~ ^[0-9]+([.][0-9]+)?$ ]]; then
  echo "paper_zoo: ZOO_MAX_TRAIN_HOURS is '$TRAIN_HOURS': expected a number of hours (0: no limit)" >&2
  exit 2
fi
for name in $NETWORKS; do
  case $name in
    nin | allconv | vgg16) ;;
    *) echo "paper_zoo: ZOO_NETWORKS has '$name': expected names among nin allconv vgg16" >&2
       exit 2 ;;
  esac
done

train_and_ship() {  # name; sets over_time=1 when its training cannot end within $TRAIN_HOURS
  local status=0
  over_time=0
  PYTHON="$PYTHON" bash scripts/train_and_ship.sh "$1" "configs/train_$1.py:$RECIPE" \
    "$RUNS/train_$1" "$CKPTS/$1" "$TRAIN_HOURS" "${TRAIN_FLAGS[@]}" || status=$?
  if [ "$status" -eq 3 ]; then
    say "$1: its training cannot end within ZOO_MAX_TRAIN_HOURS=$TRAIN_HOURS h on this host;" \
      "skipped with its checkpoint in $RUNS/train_$1 (the same command resumes it)"
    over_time=1
  elif [ "$status" -ne 0 ]; then
    exit "$status"
  fi
}

attack() {  # name workdir config images
  say "attack $2 ($3, $4 images)"
  "$PYTHON" scripts/keep_runs.py restore "$RECORDS" "$RUNS/$2"
  "$PYTHON" scripts/attack.py --config="$3" --workdir="$RUNS/$2" --config.num_images="$4" \
    --config.model="ckpt:$CKPTS/$1" "${ATTACK_FLAGS[@]}"
}

workdirs=() skipped=()
for name in $NETWORKS; do
  train_and_ship "$name"
  if [ "$over_time" -eq 1 ]; then
    skipped+=("$name")
    continue
  fi
  attack "$name" "zoo_${name}_1px" "configs/cifar10.py:$name,1,nontargeted" "$IMAGES"
  workdirs+=("$RUNS/zoo_${name}_1px")
done
if [[ " $NETWORKS " == *" nin "* && " ${skipped[*]} " != *" nin "* ]]; then
  attack nin zoo_nin_1px_scipy configs/cifar10_scipy.py:nin,1,nontargeted "$IMAGES"
  attack nin zoo_nin_3px configs/cifar10.py:nin,3,nontargeted "$IMAGES"
  attack nin zoo_nin_1px_targeted configs/cifar10.py:nin,1,targeted "$TARGETED_IMAGES"
  attack nin zoo_nin_5px configs/cifar10.py:nin,5,nontargeted "$IMAGES"
  workdirs+=("$RUNS"/zoo_nin_1px_{scipy,targeted} "$RUNS"/zoo_nin_{3,5}px)
fi
if [ ${#workdirs[@]} -gt 0 ]; then
  "$PYTHON" scripts/report.py "${workdirs[@]}" --out="$RUNS/report_zoo"
  say "report of the attack runs in $RUNS/report_zoo"
fi
if [ ${#skipped[@]} -gt 0 ]; then
  say "not done: ${skipped[*]} (training over ZOO_MAX_TRAIN_HOURS=$TRAIN_HOURS h here)"
  exit 3
fi
say "done"
