"""Engine throughput against the model's forward ceiling and SciPy's per-image DE.

    python scripts/benchmark.py --config=configs/benchmark.py --workdir=runs/benchmark \
        --config.slots=4 --config.scaling.enabled=false

Writes `benchmark.json` (or --out) and appends the Markdown tables to
`<workdir>/benchmark.md`. See docs/benchmarks.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for configs/

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from opa_jax import devices  # noqa: E402
from opa_jax.bench import benchmark  # noqa: E402
from opa_jax.errors import exit_on_input_error  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Benchmark config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/benchmark", "Directory for the JSON and Markdown.")
_OUT = flags.DEFINE_string("out", "", "JSON path (default: <workdir>/benchmark.json).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    with exit_on_input_error():
        devices.set_cpu_devices(_CONFIG.value.get("cpu_devices", 0))  # before JAX starts
    benchmark(_CONFIG.value, _WORKDIR.value, _OUT.value, log=logging.info)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
