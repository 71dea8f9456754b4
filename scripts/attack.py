"""Runs (or resumes) a one-pixel attack from a config.

    python scripts/attack.py --config=configs/lenet.py --workdir=runs/lenet_1px \
        --config.num_images=100 --config.de.preset=scipy
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for configs/

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from opa_jax import devices, run  # noqa: E402
from opa_jax.errors import exit_on_input_error  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Attack config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results and the run record.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Print the resolved config and plan; attack nothing."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _WORKDIR.value is None and not _DRY_RUN.value:
        raise app.UsageError("--workdir is required")
    with exit_on_input_error():
        devices.set_cpu_devices(_CONFIG.value.get("cpu_devices", 0))  # before JAX starts
        summary = run.run_attack(_CONFIG.value, _WORKDIR.value, dry_run=_DRY_RUN.value)
    if not _DRY_RUN.value:
        print(
            f"success rate {100 * summary['success_rate']:.1f}% over {summary['attacks']} attacks "
            f"({summary['images']} images), confidence {100 * summary['confidence']:.1f}%, "
            f"mean queries {summary['mean_queries']:.0f}; results in {_WORKDIR.value}"
        )


def parse_flags(argv):
    """absl's parser, with a bad config field or config string reported in one line."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        message = str(e).replace("\\n", " ").strip("'\"")
        if "Traceback" in message:  # config_flags embeds the config file's traceback
            message = message.strip().splitlines()[-1]
        print(f"error: bad flag or config override: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=parse_flags)
