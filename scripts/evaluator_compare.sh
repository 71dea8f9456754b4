#!/usr/bin/env bash
# Same-results runs: an attack config run with the full and with the
# incremental evaluator (scripts/compare_evaluators.py), extended in steps of images,
# for each DE preset, as one job that resumes after any stop: run the same command again.
#
#   bash scripts/background.sh start runs/compare_job bash scripts/evaluator_compare.sh
#
# Each preset's workdir ($COMPARE_RUNS/compare_<name>_<preset>) starts from the records
# kept in $COMPARE_RECORDS (scripts/keep_runs.py) when it has none, so a fresh clone
# continues where the committed records end; after every step its finished records are
# kept there again, ready to commit. comparison.json in each workdir has the tally.
#
# Environment (defaults in brackets):
#   PYTHON [.venv/bin/python]  COMPARE_RUNS [runs]  COMPARE_RECORDS [docs/runs]
#   COMPARE_NAME [resnet]  COMPARE_CONFIG [configs/lenet.py]
#   COMPARE_MODEL [keras:../shared/data/keras/resnet.h5]
#   COMPARE_PRESETS ["scipy paper"]  COMPARE_IMAGES [200]  COMPARE_STEP [25]
#   COMPARE_FLAGS: extra flags for scripts/compare_evaluators.py
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
RUNS=${COMPARE_RUNS:-runs}
RECORDS=${COMPARE_RECORDS:-docs/runs}
NAME=${COMPARE_NAME:-resnet}
CONFIG=${COMPARE_CONFIG:-configs/lenet.py}
MODEL=${COMPARE_MODEL:-keras:../shared/data/keras/resnet.h5}
PRESETS=${COMPARE_PRESETS:-scipy paper}
IMAGES=${COMPARE_IMAGES:-200}
STEP=${COMPARE_STEP:-25}
read -r -a FLAGS <<< "${COMPARE_FLAGS:-}"

say() { echo "evaluator_compare: $(date -u +%FT%TZ) $*"; }
fail() {
  echo "evaluator_compare: $*" >&2
  exit 2
}

for name in IMAGES STEP; do
  value=${!name}
  [[ $value =~ ^[1-9][0-9]*$ ]] || fail "COMPARE_$name is '$value': expected a positive whole number"
done
[[ $NAME =~ ^[A-Za-z0-9_.-]+$ ]] || fail "COMPARE_NAME is '$NAME': expected letters, digits, _ . -"
[ -n "$PRESETS" ] || fail "COMPARE_PRESETS is empty: expected presets among scipy paper"
for preset in $PRESETS; do
  case $preset in
    scipy | paper) ;;
    *) fail "COMPARE_PRESETS has '$preset': expected presets among scipy paper" ;;
  esac
done

started() {  # workdir: the largest num_images its full and incremental runs were given
  "$PYTHON" - "$1" <<'PY'
import json, os, sys
sizes = [0]
for kind in ("full", "incremental"):
    path = os.path.join(sys.argv[1], kind, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            sizes.append(json.load(f)["num_images"])
print(max(sizes))
PY
}

compared() {  # workdir: the attacks its comparison.json tallies (0 when it has none)
  "$PYTHON" - "$1" <<'PY'
import json, os, sys
path = os.path.join(sys.argv[1], "comparison.json")
print(json.load(open(path))["attacks"] if os.path.exists(path) else 0)
PY
}

step() {  # preset workdir images
  say "$1: $3 images in $2"
  "$PYTHON" scripts/compare_evaluators.py --config="$CONFIG" --config.model="$MODEL" \
    --config.de.preset="$1" --config.num_images="$3" --workdir="$2" "${FLAGS[@]}"
  "$PYTHON" scripts/keep_runs.py save "$RECORDS" "$2"
}

for preset in $PRESETS; do
  workdir="$RUNS/compare_${NAME}_$preset"
  "$PYTHON" scripts/keep_runs.py restore "$RECORDS" "$workdir"
  n=$(started "$workdir")  # a run is extended, never shrunk: finish its last step first
  # (a finished one is not run again: each run adds its start-up to the wall-time tally)
  if [ "$n" -gt 0 ] && [ "$(compared "$workdir")" -lt "$n" ]; then
    step "$preset" "$workdir" "$n"
  fi
  while [ "$n" -lt "$IMAGES" ]; do
    n=$((n + STEP > IMAGES ? IMAGES : n + STEP))
    step "$preset" "$workdir" "$n"
  done
done
say "done"
