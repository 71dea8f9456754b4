#!/usr/bin/env bash
# Sets up a virtual environment (once) and runs the main job: the paper's
# 1-pixel non-targeted attack (paper preset) on the NiN trained by this project
# (checkpoints/cifar10/nin) over the exact CIFAR-10 test images of ../shared/data,
# or tfds:cifar10 where those are absent, then the report. Extra flags go to
# scripts/attack.py, e.g. scripts/main.sh --config.num_images=50
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
WORKDIR="${WORKDIR:-runs/nin_1px}"
.venv/bin/python scripts/attack.py --config=configs/cifar10.py:nin,1,nontargeted \
  --workdir="$WORKDIR" "$@"
.venv/bin/python scripts/report.py "$WORKDIR" --out="$WORKDIR/report"
