"""Exports the successful attacks of a run's workdir as images or one .npz.

    python scripts/export_adversarial.py runs/lenet_1px --out=adv/lenet_1px --format=png

Each image is rebuilt from the source image and the recorded perturbation, and
checked to get the recorded adversarial label from the run's model (opa_jax.export).
Relative paths in the run's config are read from the directory the run started in.
"""

import json

from absl import app, flags

from opa_jax import export
from opa_jax.errors import exit_on_input_error

_OUT = flags.DEFINE_string("out", None, "Directory to write into.", required=True)
_FORMAT = flags.DEFINE_enum("format", "png", list(export.FORMATS), "png files or one .npz.")


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("expected one WORKDIR argument")
    with exit_on_input_error():
        written = export.export_workdir(argv[1], _OUT.value, _FORMAT.value)
    print(json.dumps(written))


if __name__ == "__main__":
    app.run(main)
