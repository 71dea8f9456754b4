"""FGSM, a white-box dense L-inf baseline (one gradient per image), on the same images.

--config=configs/cifar10_fgsm.py:lenet,nontargeted [--config.fgsm.epsilon=8]
"""

from configs import common


def get_config(arg=None):
    config = common.experiment(*common.parse(arg, with_pixels=False))
    config.method = "fgsm"
    return config
