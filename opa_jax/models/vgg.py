"""VGG16 for CIFAR-10, as attacked in Su, Vargas & Sakurai (Sec. 4, network table).

VGG's 13 convolutions in five stages (Simonyan & Zisserman 2015, config D),
each followed by batch norm, with a 2x2 max pool after each stage; then, as in
the one-pixel-attack authors' CIFAR-10 network, two fully connected layers of
2048 units (with dropout) and a num_classes-way output.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from opa_jax.models.base import CIFAR10_MEAN, CIFAR10_STD
from opa_jax.models.layers import conv_bn_relu, max_pool, normalize, scaled

STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGG16(nn.Module):
    """conv{stage}_{i} 3x3 (+BN, ReLU), pool after each stage, fc1/fc2 2048, fc3 logits."""

    num_classes: int = 10
    width: float = 1.0  # multiplies hidden widths; 1.0 is the paper's network
    batch_norm: bool = True
    dropout: float = 0.5
    fc_units: int = 2048
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
        for stage, widths in enumerate(STAGES, start=1):
            for i, features in enumerate(widths, start=1):
                x = conv_bn_relu(x, scaled(self.width, features), 3, f"conv{stage}_{i}", **block)
            if x.shape[1] > 1 or x.shape[2] > 1:  # 32 -> 16 -> 8 -> 4 -> 2 -> 1
                x = max_pool(x, 2, 2, "VALID", fast_gradients=fast)
            # else the map is already one position (images under 32x32, such as progressive
            # resizing's 16 and 24): a pool would leave nothing, so it passes as it is.
        x = x.reshape(x.shape[0], -1)  # [N, 512] for 32x32 input
        for i in (1, 2):
            x = nn.Dense(scaled(self.width, self.fc_units), dtype=self.dtype, name=f"fc{i}")(x)
            x = nn.relu(x)
            x = nn.Dropout(self.dropout, deterministic=not train, name=f"drop_fc{i}")(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc3")(x)
        return x.astype(jnp.float32)  # [N, num_classes] logits
