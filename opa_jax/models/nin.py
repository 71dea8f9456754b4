"""Network in Network (Lin, Chen & Yan 2014), the Caffe CIFAR-10 variant.

One of the three CIFAR-10 networks attacked in Su, Vargas & Sakurai (Sec. 4).
Layer names follow the Caffe model zoo prototxt (conv1, cccp1, ...).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from opa_jax.models.base import CIFAR10_MEAN, CIFAR10_STD
from opa_jax.models.layers import ceil_mode_padding, conv, conv_bn_relu, max_pool, normalize, scaled


class NiN(nn.Module):
    """NiN for CIFAR-10: three mlpconv blocks, global average pooling.

    Blocks: conv1 5x5 192 / cccp1 1x1 160 / cccp2 1x1 96, max pool 3/2, dropout;
    conv2 5x5 192 / cccp3 1x1 192 / cccp4 1x1 192, avg pool 3/2, dropout;
    conv3 3x3 192 / cccp5 1x1 192 / cccp6 1x1 num_classes, global avg pool.
    Pools use Caffe's ceil-mode output size (32 -> 16 -> 8). With `batch_norm`
    each hidden conv is followed by batch norm (and has no bias). cccp6 gives
    the logits directly: the Caffe model has a ReLU there, which would clamp
    logits at zero; the parameter count is unaffected.
    """

    num_classes: int = 10
    width: float = 1.0  # multiplies hidden widths; 1.0 is the paper's network
    batch_norm: bool = True
    dropout: float = 0.5
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD
    dtype: Any = jnp.float32  # compute dtype (bfloat16 for mixed precision)
    fast_gradients: bool = True  # layers' fast_conv/fast_max_pool (same values, fast CPU gradients)

    @nn.compact
    def __call__(self, images, train: bool = False):
        # images: [N, H, W, 3] float RGB 0-255
        x = normalize(images, self.mean, self.std, self.dtype)
        fast = self.fast_gradients
        block = dict(batch_norm=self.batch_norm, train=train, dtype=self.dtype, fast_gradients=fast)
        w = lambda f: scaled(self.width, f)

        x = conv_bn_relu(x, w(192), 5, "conv1", **block)
        x = conv_bn_relu(x, w(160), 1, "cccp1", **block)
        x = conv_bn_relu(x, w(96), 1, "cccp2", **block)
        x = max_pool(x, 3, 2, ceil_mode_padding(x.shape[1:3], 3, 2), fast_gradients=fast)
        x = nn.Dropout(self.dropout, deterministic=not train, name="drop1")(x)

        x = conv_bn_relu(x, w(192), 5, "conv2", **block)
        x = conv_bn_relu(x, w(192), 1, "cccp3", **block)
        x = conv_bn_relu(x, w(192), 1, "cccp4", **block)
        x = nn.avg_pool(
            x,
            (3, 3),
            (2, 2),
            padding=ceil_mode_padding(x.shape[1:3], 3, 2),
            count_include_pad=False,  # Caffe averages over the in-image part of a window
        )
        x = nn.Dropout(self.dropout, deterministic=not train, name="drop2")(x)

        x = conv_bn_relu(x, w(192), 3, "conv3", **block)
        x = conv_bn_relu(x, w(192), 1, "cccp5", **block)
        x = conv(self.num_classes, 1, "cccp6", dtype=self.dtype, fast_gradients=fast)(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # [N, num_classes] logits
