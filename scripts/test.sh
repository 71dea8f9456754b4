#!/usr/bin/env bash
# Sets up a virtual environment (once, pinned to constraints.txt), prints the installed
# jax, jaxlib, flax, optax and numpy versions, and runs the whole test suite (the 15
# slowest tests listed at the end).
# Real-data tests read ../shared/data and skip with a reason when it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
# Two worker processes (pytest-xdist), a test file each at a time: XLA compiles on one
# thread, so two workers keep both cores of a small machine busy. PYTEST_WORKERS overrides.
# tests/conftest.py compiles at XLA's backend optimisation level 0 (OPA_TEST_XLA_OPTIMIZE=1: default).
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "${PYTEST_WORKERS:-2}" --dist loadfile \
    --durations=15 "$@"
