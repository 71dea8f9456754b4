"""Throughput benchmark: the imported Keras LeNet, where the engine's own costs show most.

    python scripts/benchmark.py --config=configs/benchmark_lenet.py --workdir=runs/benchmark_lenet

LeNet costs about 0.65 MFLOP per image, so per-generation overheads (the DE
step, building perturbed images, host work) are a visible share here, unlike
for ResNet or NiN. More generations and repetitions, a larger early-stop and
bf16 success sample, and the scaling tables without the image-size models.
"""

from configs import benchmark


def get_config():
    config = benchmark.get_config()
    config.model = "keras:../shared/data/keras/lenet.h5"
    config.de.generations = 10
    config.repetitions = 5
    config.early_stop.num_images = 32
    config.memory.slots = (1, 10)
    config.scaling.generations = 2
    config.scaling.repetitions = 3
    config.scaling.slots = (1, 2, 4, 10)
    config.scaling.image_models = ()
    config.scaling.forward_batches = (400, 800, 1600, 4000)  # 1, 2, 4, 10 slots at popsize 400
    config.scaling.forward_rounds = 5
    return config
