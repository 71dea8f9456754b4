"""Writes a report (report.md and PNG figures) over one or more attack workdirs.

python scripts/report.py runs/lenet_1px runs/lenet_3px --out=reports/lenet
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from opa_jax import report  # noqa: E402
from opa_jax.errors import exit_on_input_error  # noqa: E402

_OUT = flags.DEFINE_string("out", None, "Folder for report.md and the figures.", required=True)


def main(argv):
    with exit_on_input_error():
        path = report.write_report(argv[1:], _OUT.value)
    print(f"report written to {path}")


if __name__ == "__main__":
    app.run(main)
