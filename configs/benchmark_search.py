"""The exhaustive one-pixel search against the paper's DE, on a shipped network.

    python scripts/benchmark.py --config=configs/benchmark_search.py:nin \\
        --workdir=runs/benchmark_search

NETWORK is nin (the default), allconv or vgg16 (checkpoints/cifar10/). Both
searches attack the same first `search.num_images` correctly classified exact
test images, with the incremental evaluator, one after the other in each of
`search.repetitions` rounds: the paper preset (400 x 100, early stop at
p(true) < 5%) and the exhaustive search over every position and corner
colour, stopping at the first candidate that fools. The report gives both
images/s, their ratio, the queries and the successes. The main section runs
briefly first (2 generations, 2 images). About 10 minutes for NiN on a 2-core CPU.
"""

from configs import benchmark, common


def get_config(arg=None):
    network = arg or "nin"
    if network not in ("nin", "allconv", "vgg16"):
        raise ValueError(f"benchmark_search.py:{network}: expected nin, allconv or vgg16")
    config = benchmark.get_config()
    config.model = common.CIFAR10_MODELS[network]
    config.evaluator = "incremental"
    config.slots = 1
    config.num_images = 2
    config.repetitions = 1
    config.breakdown = False
    config.baseline.enabled = False
    config.early_stop.enabled = False
    config.bf16.enabled = False
    config.memory.enabled = False
    config.scaling.enabled = False
    config.search.enabled = True
    return config
