"""Random search with DE's query budget (Su et al. 2019, Sec. V-A, the DE-vs-random check):
every generation draws a fresh population from the paper's initial distribution.

    --config=configs/cifar10_random_search.py:lenet,1,nontargeted
"""

from configs import common


def get_config(arg=None):
    config = common.experiment(*common.parse(arg))
    config.de.preset = "random"
    return config
