#!/usr/bin/env bash
# Sets up a virtual environment (once) and runs the main job: the paper's
# 1-pixel non-targeted attack on the imported Keras LeNet over the exact
# CIFAR-10 test images, then the report. Extra flags go to scripts/attack.py,
# e.g. scripts/main.sh --config.num_images=50
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
WORKDIR="${WORKDIR:-runs/lenet_1px}"
.venv/bin/python scripts/attack.py --config=configs/lenet.py --workdir="$WORKDIR" "$@"
if [ -f scripts/report.py ]; then
  .venv/bin/python scripts/report.py "$WORKDIR" --out="$WORKDIR/report"
fi
