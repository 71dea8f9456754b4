"""Incremental against full evaluator, per model: queries/s, FLOPs, cache bytes.

    python scripts/bench_incremental.py --models=random:nin,keras:../shared/data/keras/lenet.h5 \
        --pixels=1 --out=runs/bench_incremental.json
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_MODELS = flags.DEFINE_list("models", ["random:nin"], "Model specs (opa_jax.models.load_model).")
_PIXELS = flags.DEFINE_list("pixels", ["1"], "Pixel counts.")
_POPSIZE = flags.DEFINE_integer("popsize", 400, "Candidates per device per evaluation.")
_REPETITIONS = flags.DEFINE_integer("repetitions", 3, "Interleaved timings of each evaluator.")
_LOOP_CALLS = flags.DEFINE_integer("loop_calls", 2, "Evaluations per timing (one jitted loop).")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "XLA CPU devices (0: one per core).")
_OUT = flags.DEFINE_string("out", "", "JSON file for the measurements (appended rows).")


def main(argv):
    del argv
    from opa_jax import run

    run.set_cpu_devices(_CPU_DEVICES.value)  # before JAX starts
    from opa_jax import incremental_bench
    from opa_jax.models import load_model

    rows = []
    for spec in _MODELS.value:
        model = load_model(spec)
        for pixels in _PIXELS.value:
            row = incremental_bench.evaluator_comparison(
                model, int(pixels), _POPSIZE.value, _REPETITIONS.value, _LOOP_CALLS.value
            )
            rows.append(row)
            print(incremental_bench.markdown([row]).splitlines()[-1], flush=True)
            if _OUT.value:
                with open(_OUT.value, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print(incremental_bench.markdown(rows))


if __name__ == "__main__":
    app.run(main)
