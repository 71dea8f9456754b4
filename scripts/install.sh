#!/usr/bin/env bash
# Creates .venv (once) and installs the project into it, pinned to constraints.txt: the
# versions that CI last passed with. Usage: scripts/install.sh [EXTRA], e.g. `test`.
# Without the pins (`pip install -e .`) the newest versions the ranges allow are taken.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
target="."
[ -n "${1:-}" ] && target=".[$1]"
.venv/bin/python -m pip install -q -c constraints.txt -e "$target"
.venv/bin/python - <<'PY'
from importlib.metadata import version
print("installed:", ", ".join(f"{n} {version(n)}" for n in ("jax", "jaxlib", "flax", "optax", "numpy")))
PY
