#!/usr/bin/env bash
# The shipped NiN's recipe taken apart one factor at a time: each variant of NiN trained
# on this host, shipped, and searched exhaustively on its own first 100 correctly
# classified exact test images, then the paper-gap report over every shipped network.
# One job that resumes after any stop: run the same command again.
#
#   bash scripts/background.sh start runs/paper_gap_job bash scripts/paper_gap_zoo.sh
#
# Variants (configs/train_nin.py:<name without nin_>; `configs/cifar10.py:<name>,...`
# attacks each once shipped):
#   nin_no_smoothing   the shipped recipe (`short`) without label smoothing
#   nin_plain          NiN as Lin et al. trained it: no batch norm, no label smoothing,
#                      dropout 0.5, crops and flips
#   nin_plain_noaug    the same without crops and flips
# For each variant in order: train (resumes from its checkpoints), ship the final model
# to $GAP_CHECKPOINTS/<name> (once; never overwritten), then the exhaustive one-pixel
# search (corner colours, stop=none) in $GAP_RUNS/search_<name>_none, its records kept
# in $GAP_RECORDS. Then the same search on the shipped NiN over other images, as the paper
# drew its images at random: 1.4 x $GAP_IMAGES indices drawn at random (seed 0) from
# $GAP_OTHER_IMAGES, the first $GAP_IMAGES correctly classified of them attacked, in
# $GAP_RUNS/search_nin_other_images_none. Last, scripts/paper_gap.py over nin, allconv,
# vgg16 (with their runs kept in $GAP_RECORDS), every variant shipped and NiN on the
# other images (as `nin_other_images`), into $GAP_OUT.
#
# Environment (defaults in brackets):
#   PYTHON [.venv/bin/python]  GAP_RUNS [runs]  GAP_CHECKPOINTS [checkpoints/cifar10]
#   GAP_VARIANTS [all three]  GAP_IMAGES [100]
#   GAP_RECORDS [docs/runs]  GAP_OUT [docs/paper_gap]
#   GAP_OTHER_IMAGES [115:1017]: an A:B range of image indices: those after NiN's first
#     100 correctly classified exact test images (0-114); empty: no such search.
#   GAP_MAX_TRAIN_HOURS [2.5]: a training projected (at its first log lines) to need more
#     hours than this here stops with its checkpoint; the job skips that variant's search,
#     goes on, and exits 3 at the end. 0: no limit.
#   GAP_TRAIN_FLAGS, GAP_ATTACK_FLAGS, GAP_REPORT_FLAGS: extra flags for scripts/train.py,
#     scripts/attack.py and scripts/paper_gap.py
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
RUNS=${GAP_RUNS:-runs}
CKPTS=${GAP_CHECKPOINTS:-checkpoints/cifar10}
VARIANTS=${GAP_VARIANTS:-nin_no_smoothing nin_plain nin_plain_noaug}
IMAGES=${GAP_IMAGES:-100}
RECORDS=${GAP_RECORDS:-docs/runs}
OUT=${GAP_OUT:-docs/paper_gap}
TRAIN_HOURS=${GAP_MAX_TRAIN_HOURS:-2.5}
OTHER=${GAP_OTHER_IMAGES-115:1017}
read -r -a TRAIN_FLAGS <<< "${GAP_TRAIN_FLAGS:-}"
read -r -a ATTACK_FLAGS <<< "${GAP_ATTACK_FLAGS:-}"
read -r -a REPORT_FLAGS <<< "${GAP_REPORT_FLAGS:-}"
KNOWN="nin_no_smoothing nin_plain nin_plain_noaug"

say() { echo "paper_gap_zoo: $(date -u +%FT%TZ) $*"; }

if ! [[ $TRAIN_HOURS =~ ^[0-9]+([.][0-9]+)?$ ]]; then
  echo "paper_gap_zoo: GAP_MAX_TRAIN_HOURS is '$TRAIN_HOURS': expected a number of hours (0: no limit)" >&2
  exit 2
fi
if [ -n "$OTHER" ] && ! [[ $OTHER =~ ^[0-9]+:[0-9]+$ ]]; then
  echo "paper_gap_zoo: GAP_OTHER_IMAGES is '$OTHER': expected an A:B range of image indices" >&2
  exit 2
fi
for name in $VARIANTS; do
  if [[ " $KNOWN " != *" $name "* ]]; then
    echo "paper_gap_zoo: GAP_VARIANTS has '$name': expected names among $KNOWN" >&2
    exit 2
  fi
done

train_and_ship() {  # name; returns 3 when its training cannot end within $TRAIN_HOURS
  local status=0
  PYTHON="$PYTHON" bash scripts/train_and_ship.sh "$1" "configs/train_nin.py:${1#nin_}" \
    "$RUNS/train_$1" "$CKPTS/$1" "$TRAIN_HOURS" "${TRAIN_FLAGS[@]}" || status=$?
  if [ "$status" -eq 3 ]; then
    say "$1: its training cannot end within GAP_MAX_TRAIN_HOURS=$TRAIN_HOURS h on this" \
      "host; skipped with its checkpoint in $RUNS/train_$1 (the same command resumes it)"
    return 3
  elif [ "$status" -ne 0 ]; then
    exit "$status"
  fi
}

search() {  # name, workdir, [flags]: the exhaustive one-pixel search over $IMAGES images
  local name=$1 workdir=$2
  shift 2
  "$PYTHON" scripts/keep_runs.py restore "$RECORDS" "$workdir"
  say "$name: exhaustive search in $workdir"
  "$PYTHON" scripts/attack.py --config="configs/cifar10.py:nin,1,nontargeted" \
    --config.model="ckpt:$CKPTS/$name" --config.num_images="$IMAGES" "$@" \
    --config.method=exhaustive --config.exhaustive.stop=none "${ATTACK_FLAGS[@]}" \
    --workdir="$workdir"
  "$PYTHON" scripts/keep_runs.py save "$RECORDS" "$workdir"
}

drawn() {  # A:B: 1.4 x $IMAGES of those indices in a random order (seed 0), comma-separated
  "$PYTHON" -c 'import sys, numpy as np
low, high = map(int, sys.argv[1].split(":"))
drawn = np.random.default_rng(0).permutation(np.arange(low, high))[: -(-14 * int(sys.argv[2]) // 10)]
print(",".join(map(str, drawn)))' "$1" "$IMAGES"
}

skipped=()
for name in $VARIANTS; do
  if train_and_ship "$name"; then
    search "$name" "$RUNS/search_${name}_none"
  else
    skipped+=("$name")
  fi
done

other="search_nin_other_images_none"
if [ -n "$OTHER" ] && [ -f "$CKPTS/nin/model.json" ]; then
  search nin "$RUNS/$other" --config.selection="$(drawn "$OTHER")"
fi

report=()
for name in nin allconv vgg16 $KNOWN; do
  [ -f "$CKPTS/$name/model.json" ] || continue
  runs=()
  for run in "zoo_${name}_1px" "zoo_${name}_1px_targeted" "search_${name}_first" "search_${name}_none"; do
    [ -f "$RECORDS/$run/results.jsonl" ] && runs+=("$RECORDS/$run")
  done
  [ ${#runs[@]} -gt 0 ] || continue
  report+=("--model=$name:ckpt:$CKPTS/$name" "--runs=$name:$(IFS=,; echo "${runs[*]}")")
done
if [ -f "$CKPTS/nin/model.json" ] && [ -f "$RECORDS/$other/results.jsonl" ]; then
  report+=("--model=nin_other_images:ckpt:$CKPTS/nin" "--runs=nin_other_images:$RECORDS/$other")
fi
if [ ${#report[@]} -gt 0 ]; then
  "$PYTHON" scripts/paper_gap.py --out="$OUT" "${report[@]}" "${REPORT_FLAGS[@]}"
  say "the paper-gap report in $OUT"
fi
if [ ${#skipped[@]} -gt 0 ]; then
  say "not done: ${skipped[*]} (training over GAP_MAX_TRAIN_HOURS=$TRAIN_HOURS h here)"
  exit 3
fi
say "done"
