#!/usr/bin/env bash
# Rewrites constraints.txt from a fresh environment at the newest versions that
# setup.cfg's ranges allow, after the test suite passes there. Commit the result.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
venv=$(mktemp -d)/venv
"$PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e '.[test]'
"$venv/bin/python" -m pytest -q -p no:cacheprovider
{
  echo "# Versions CI last passed with (scripts/refresh_constraints.sh writes this file)."
  "$venv/bin/python" -m pip freeze --exclude-editable | grep -v '^opa[-_]jax'
} > constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) packages pinned"
