"""All Convolutional Net, All-CNN-C (Springenberg, Dosovitskiy, Brox & Riedmiller 2014).

One of the three CIFAR-10 networks attacked in Su, Vargas & Sakurai (Sec. 4).
Max pooling is replaced by stride-2 convolutions (Springenberg et al., Table 2).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from opa_jax.models.base import CIFAR10_MEAN, CIFAR10_STD
from opa_jax.models.layers import conv, conv_bn_relu, normalize, scaled


class AllConv(nn.Module):
    """All-CNN-C: 3x3 96 x2, 3x3 96 /2, 3x3 192 x2, 3x3 192 /2, 3x3 192 valid,
    1x1 192, 1x1 num_classes, global average pooling (over 6x6 for 32x32 input).

    Dropout 0.2 on the input and 0.5 after each strided conv. With `batch_norm`
    each hidden conv is followed by batch norm (and has no bias). conv9 gives the
    logits directly (the paper has a ReLU there, which would clamp logits at zero).
    """

    num_classes: int = 10
    width: float = 1.0  # multiplies hidden widths; 1.0 is the paper's network
    batch_norm: bool = True
    input_dropout: float = 0.2
    dropout: float = 0.5
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD
    dtype: Any = jnp.float32
    fast_gradients: bool = True  # layers' fast_conv/fast_max_pool (same values, fast CPU gradients)

    @nn.compact
    def __call__(self, images, train: bool = False):
        # images: [N, H, W, 3] float RGB 0-255
        x = normalize(images, self.mean, self.std, self.dtype)
        fast = self.fast_gradients
        block = dict(batch_norm=self.batch_norm, train=train, dtype=self.dtype, fast_gradients=fast)
        w = lambda f: scaled(self.width, f)

        x = nn.Dropout(self.input_dropout, deterministic=not train, name="drop0")(x)
        x = conv_bn_relu(x, w(96), 3, "conv1", **block)
        x = conv_bn_relu(x, w(96), 3, "conv2", **block)
        x = conv_bn_relu(x, w(96), 3, "conv3", stride=2, **block)  # 32 -> 16
        x = nn.Dropout(self.dropout, deterministic=not train, name="drop3")(x)
        x = conv_bn_relu(x, w(192), 3, "conv4", **block)
        x = conv_bn_relu(x, w(192), 3, "conv5", **block)
        x = conv_bn_relu(x, w(192), 3, "conv6", stride=2, **block)  # 16 -> 8
        x = nn.Dropout(self.dropout, deterministic=not train, name="drop6")(x)
        x = conv_bn_relu(x, w(192), 3, "conv7", padding="VALID", **block)  # 8 -> 6
        x = conv_bn_relu(x, w(192), 1, "conv8", **block)
        x = conv(self.num_classes, 1, "conv9", dtype=self.dtype, fast_gradients=fast)(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # [N, num_classes] logits
