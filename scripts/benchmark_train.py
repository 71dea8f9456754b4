"""Training speed: the eval forward pass against a whole train step, plain and fast.

    python scripts/benchmark_train.py --config=configs/benchmark_train.py --out=runs/train_speed

Writes `<out>/train_speed.json` and `<out>/train_speed.md` (the table of
docs/models.md) and prints the table.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for configs/

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from opa_jax import devices, train_speed  # noqa: E402
from opa_jax.errors import exit_on_input_error  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/benchmark_train.py", "Benchmark config.", lock_config=True
)
_OUT = flags.DEFINE_string("out", "runs/train_speed", "Directory for the JSON and Markdown.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    with exit_on_input_error():
        devices.set_cpu_devices(_CONFIG.value.cpu_devices)  # before JAX starts
        table = train_speed.benchmark(_CONFIG.value, _OUT.value, log=logging.info)
    print(table)


if __name__ == "__main__":
    app.run(main)
