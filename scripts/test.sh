#!/usr/bin/env bash
# Sets up a virtual environment (once, pinned to constraints.txt), prints the installed
# jax, jaxlib, flax, optax and numpy versions, and runs the whole test suite.
# Real-data tests read ../shared/data and skip with a reason when it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
