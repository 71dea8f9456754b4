"""LeNet-5 for 28 x 28 grayscale digits (LeCun, Bottou, Bengio & Haffner 1998), as
MNIST and Fashion-MNIST take it: images [N, 28, 28, 1].

The classic layout with ReLU and max pooling: 5x5 conv 6 (same padding), 2x2 pool,
5x5 conv 16 (valid), 2x2 pool, dense 120, dense 84, dense num_classes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from opa_jax.models.base import MNIST_MEAN, MNIST_STD
from opa_jax.models.layers import conv, normalize, scaled


class LeNet5(nn.Module):
    """LeNet-5 (see the module docstring); `width` multiplies the hidden widths."""

    num_classes: int = 10
    width: float = 1.0
    mean: tuple[float, ...] = MNIST_MEAN
    std: tuple[float, ...] = MNIST_STD
    dtype: Any = jnp.float32
    fast_gradients: bool = True  # layers' fast_conv (same values, fast CPU gradients)

    @nn.compact
    def __call__(self, images, train: bool = False):
        # images: [N, 28, 28, 1] float grayscale 0-255
        del train  # no dropout or batch norm
        x = normalize(images, self.mean, self.std, self.dtype)
        layer = dict(dtype=self.dtype, fast_gradients=self.fast_gradients)
        w = lambda f: scaled(self.width, f)
        x = nn.relu(conv(w(6), 5, "conv1", padding="SAME", **layer)(x))  # [N, 28, 28, 6]
        x = nn.max_pool(x, (2, 2), (2, 2))  # [N, 14, 14, 6]
        x = nn.relu(conv(w(16), 5, "conv2", padding="VALID", **layer)(x))  # [N, 10, 10, 16]
        x = nn.max_pool(x, (2, 2), (2, 2))  # [N, 5, 5, 16]
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(w(120), dtype=self.dtype, name="fc1")(x))
        x = nn.relu(nn.Dense(w(84), dtype=self.dtype, name="fc2")(x))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc3")(x)
        return x.astype(jnp.float32)  # [N, num_classes] logits
