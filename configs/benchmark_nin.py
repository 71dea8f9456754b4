"""Throughput benchmark: Network in Network (random weights) at the paper's DE settings.

    python scripts/benchmark.py --config=configs/benchmark_nin.py --workdir=runs/benchmark_nin

NiN is about 0.45 GFLOP per image, so on a 2-core CPU one generation of one
image (400 candidates) takes seconds: 1 slot, 2 generations, and the scaling
tables left to configs/benchmark.py. Random weights make success rates
meaningless, so early stopping is not measured; throughput does not depend on
the weights.
"""

from configs import benchmark


def get_config():
    config = benchmark.get_config()
    config.model = "random:nin"
    config.data = ""  # random images, labelled by the model
    config.slots = 1
    config.num_images = 2
    config.early_stop.enabled = False
    config.memory.slots = (2,)
    config.scaling.enabled = False
    return config
