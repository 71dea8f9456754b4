"""Training speed of the zoo's CIFAR-10 networks at full width (scripts/benchmark_train.py).

The eval forward pass against a whole train step with the plain and the fast
operations (opa_jax.models.fast_ops), on meshes of each device count, one
process, interleaved rounds. About 15 minutes on an idle 2-core CPU.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.models = ("nin", "allconv", "vgg16")
    config.batch_size = 128
    config.device_counts = (1, 2)  # meshes measured; at most the devices the host is split into
    config.width = 1.0  # the paper's networks (smaller only for tests)
    # Progressive resizing (configs/train_default.py): the train step also at these heights,
    # for models that take them (fully convolutional: nin, allconv); () = skip.
    config.train_sizes = ()
    config.rounds = 3  # timed calls of each function, interleaved; the fastest counts
    config.cpu_devices = 0  # CPU hosts: XLA devices (0 = one per core, as in training)
    return config
