"""The incremental evaluator against full forward passes, on every supported model.

    python scripts/benchmark.py --config=configs/benchmark_incremental.py \
        --workdir=runs/benchmark_incremental

The main section runs on random NiN with the incremental evaluator (its
engine against the forward ceiling and SciPy's per-image DE); the
`incremental` section then times, per model, the forward pass and both
evaluators at one slot of 400 candidates per device, interleaved, with XLA's
FLOPs and bytes per query and the activation cache per in-flight image
(k = 1, and k = 3 and 5 on NiN). About 20 minutes on a 2-core CPU.
"""

from configs import benchmark


def get_config():
    config = benchmark.get_config()
    config.model = "random:nin"
    config.data = ""  # random images, labelled by the model
    config.evaluator = "incremental"
    config.slots = 1
    config.num_images = 2
    config.repetitions = 2
    config.breakdown = False
    config.early_stop.enabled = False
    config.bf16.enabled = False
    config.memory.enabled = False
    config.scaling.enabled = False
    config.incremental.enabled = True
    config.incremental.repetitions = 3
    config.incremental.loop_calls = 1  # AlexNet's 800 images take tens of seconds per call
    return config
