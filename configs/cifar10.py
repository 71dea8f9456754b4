"""The paper's CIFAR-10 experiments (Su et al. 2019, Sec. IV-A; Table 2, Figs. 3-5).

    --config=configs/cifar10.py:MODEL,PIXELS,MODE, e.g. configs/cifar10.py:nin,3,targeted

DE with the paper's settings (population 400, 100 generations, F = 0.5) on the
exact CIFAR-10 test images; MODEL in nin, allconv, vgg16, lenet, resnet, and NiN's
variants nin_no_smoothing, nin_plain, nin_plain_noaug (configs/train_nin.py).
"""

from configs import common


def get_config(arg=None):
    return common.experiment(*common.parse(arg))
