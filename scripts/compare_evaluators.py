"""Runs one attack config with the full and with the incremental evaluator, and compares.

    python scripts/compare_evaluators.py --config=configs/lenet.py \
        --workdir=runs/compare_lenet_scipy --config.de.preset=scipy --config.num_images=200

The runs go to WORKDIR/full and WORKDIR/incremental (each resumable as with
scripts/attack.py); the per-attack comparison to WORKDIR/comparison.json.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for configs/

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from opa_jax import devices, run  # noqa: E402
from opa_jax.errors import exit_on_input_error  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Attack config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for both runs and the comparison.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    with exit_on_input_error():
        devices.set_cpu_devices(_CONFIG.value.get("cpu_devices", 0))  # before JAX starts
        comparison = run.compare_evaluators(_CONFIG.value, _WORKDIR.value)
    print(
        f"{comparison['same']} of {comparison['attacks']} attacks identical; successes "
        f"{comparison['success_full']} (full) and {comparison['success_incremental']} "
        f"(incremental); max probability difference {comparison['max_prob_diff']:.2e}; "
        f"wall seconds {comparison['wall_seconds']}"
    )


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    flags.mark_flag_as_required("workdir")
    app.run(main)
