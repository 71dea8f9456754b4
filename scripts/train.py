"""Trains a zoo model on CIFAR-10 and writes a model checkpoint to <workdir>/model.

    python scripts/train.py --config=configs/train_nin.py --workdir=runs/nin \
        --config.dataset=folder:/tmp/cifar10-jpeg

The same command resumes from <workdir>/checkpoints. SIGTERM checkpoints after the
step in progress and exits with status 143; `config.checkpoint_every_seconds` bounds
what a SIGKILL loses. A run that `config.max_hours` says cannot end in time stops at
one of its first log lines with a checkpoint and exits with status 3.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from opa_jax import devices, train  # noqa: E402
from opa_jax.errors import exit_on_input_error  # noqa: E402

EXIT_OVER_TIME = 3  # the run was projected past config.max_hours

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/train_default.py", "Training config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and the model.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    with exit_on_input_error():
        devices.set_cpu_devices(_CONFIG.value.cpu_devices)  # before JAX starts
        result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if result.get("stop_reason") == "SIGTERM":
        sys.exit(128 + signal.SIGTERM)
    if result.get("stop_reason") == "max_hours":
        print(
            f"train.py: stopped at step {result['step']}: at this machine's speed the run "
            f"would take more than --config.max_hours={_CONFIG.value.max_hours:g} h "
            f"(the log gives the projection); its checkpoint in {_WORKDIR.value} resumes "
            "with the same command",
            file=sys.stderr,
        )
        sys.exit(EXIT_OVER_TIME)


if __name__ == "__main__":
    app.run(main)
