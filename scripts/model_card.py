"""Prints the markdown model card of a model checkpoint written by scripts/train.py.

python scripts/model_card.py checkpoints/cifar10/nin [more checkpoints...]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402

from opa_jax.errors import exit_on_input_error  # noqa: E402
from opa_jax.models.model_card import model_card  # noqa: E402


def main(argv):
    if len(argv) < 2:
        raise app.UsageError("expected one or more model checkpoint directories")
    with exit_on_input_error():
        print("\n".join(model_card(path) for path in argv[1:]))


if __name__ == "__main__":
    app.run(main)
