"""The imported Keras LeNet (one-pixel-attack-keras) on the exact CIFAR-10 test images."""

from configs import default


def get_config():
    config = default.get_config()
    config.model = "keras:../shared/data/keras/lenet.h5"
    return config
