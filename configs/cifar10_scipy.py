"""one-pixel-attack-keras reproduced: SciPy-style DE (best1bin, dithered F in [0.5, 1),
Latin hypercube init, population 400, at most 75 generations, stop on a wrong argmax).

    --config=configs/cifar10_scipy.py:lenet,1,nontargeted

Compare with ../shared/data/hyperparticle-results (LeNet and ResNet, 100 images).
"""

from configs import common


def get_config(arg=None):
    config = common.experiment(*common.parse(arg))
    config.de.preset = "scipy"
    return config
