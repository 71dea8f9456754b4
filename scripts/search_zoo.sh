#!/usr/bin/env bash
# The exhaustive one-pixel search and the minimum-pixels run on the shipped CIFAR-10
# networks, on the same 100 exact test images as the paper table's rows (the first 100
# that each network classifies correctly), as one job that resumes after any stop: run
# the same command again.
#
#   bash scripts/background.sh start runs/search_zoo_job bash scripts/search_zoo.sh
#
# Rows (workdir runs/<name>; each resumes, and a finished row costs seconds):
#   search_nin_first      NiN, exhaustive, corner colours, stop at the first fooling one
#   search_nin_none       NiN, exhaustive, corner colours, the whole grid
#   min_pixels_nin        NiN, smallest k of 1, 2, 3, 5, 10 (corner search for k > 1)
#   min_pixels_nin_de     the same with the paper's DE for k > 1, at the same budget
#   search_allconv_none   All-CNN-C, exhaustive, the whole grid
#   search_vgg16_none     VGG16, exhaustive, the whole grid
#   search_nin_levels3    NiN, exhaustive over 27 colours (3 levels a channel), stop first
# Each row starts from the records kept in $SEARCH_RECORDS (scripts/keep_runs.py) when its
# workdir has none, and its finished records are kept there after it ends.
#
# Environment (defaults in brackets): PYTHON [.venv/bin/python]  SEARCH_RUNS [runs]
#   SEARCH_IMAGES [100]  SEARCH_RECORDS [docs/runs]  SEARCH_ROWS [all of the above]
#   SEARCH_FLAGS: extra flags for scripts/attack.py
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
RUNS=${SEARCH_RUNS:-runs}
IMAGES=${SEARCH_IMAGES:-100}
RECORDS=${SEARCH_RECORDS:-docs/runs}
ALL_ROWS="search_nin_first search_nin_none min_pixels_nin min_pixels_nin_de search_allconv_none search_vgg16_none search_nin_levels3"
ROWS=${SEARCH_ROWS:-$ALL_ROWS}
read -r -a EXTRA <<< "${SEARCH_FLAGS:-}"

say() { echo "search_zoo: $(date -u +%FT%TZ) $*"; }

row_flags() {  # the network and flags of a row
  case $1 in
    search_nin_first) echo "nin --config.method=exhaustive" ;;
    search_nin_none) echo "nin --config.method=exhaustive --config.exhaustive.stop=none" ;;
    min_pixels_nin) echo "nin --config.method=min_pixels" ;;
    min_pixels_nin_de) echo "nin --config.method=min_pixels --config.min_pixels.search=de" ;;
    search_allconv_none) echo "allconv --config.method=exhaustive --config.exhaustive.stop=none" ;;
    search_vgg16_none) echo "vgg16 --config.method=exhaustive --config.exhaustive.stop=none" ;;
    search_nin_levels3) echo "nin --config.method=exhaustive --config.exhaustive.colours=levels:3" ;;
    *) return 1 ;;
  esac
}

for row in $ROWS; do
  if ! row_flags "$row" > /dev/null; then
    echo "search_zoo: SEARCH_ROWS has '$row': expected names among $ALL_ROWS" >&2
    exit 2
  fi
done

for row in $ROWS; do
  read -r -a flags <<< "$(row_flags "$row")"
  network=${flags[0]}
  workdir="$RUNS/$row"
  "$PYTHON" scripts/keep_runs.py restore "$RECORDS" "$workdir"
  say "$row: starting"
  "$PYTHON" scripts/attack.py --config="configs/cifar10.py:$network,1,nontargeted" \
    --config.num_images="$IMAGES" "${flags[@]:1}" "${EXTRA[@]}" --workdir="$workdir"
  "$PYTHON" scripts/keep_runs.py save "$RECORDS" "$workdir"
  say "$row: done"
done
say "all rows done"
