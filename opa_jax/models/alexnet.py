"""BVLC AlexNet, the Caffe reference model.

Su, Vargas & Sakurai (Sec. 4.4) attack BVLC AlexNet on ImageNet. The layers
and names follow Caffe's `bvlc_alexnet` deploy prototxt: conv1 -> LRN -> pool
-> conv2 (2 groups) -> LRN -> pool -> conv3 -> conv4 (2 groups) -> conv5 (2
groups) -> pool -> fc6 -> fc7 -> fc8.
Its weights are imported by `opa_jax.models.alexnet_weights`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from opa_jax.models.layers import ceil_mode_padding, local_response_norm

IMAGENET_MEAN_BGR = (104.0, 117.0, 123.0)  # Caffe's ImageNet mean pixel, BGR


class AlexNet(nn.Module):
    """BVLC AlexNet. Input: RGB 0-255 [N, 227, 227, 3]; output: logits [N, num_classes]."""

    num_classes: int = 1000
    mean_bgr: tuple[float, float, float] = IMAGENET_MEAN_BGR
    dropout: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool = False):
        # Caffe models see BGR minus the mean pixel.
        x = images[..., ::-1] - jnp.asarray(self.mean_bgr)
        x = x.astype(self.dtype)

        def conv(x, features, kernel, stride, padding, groups, name):
            x = nn.Conv(
                features,
                (kernel, kernel),
                strides=stride,
                padding=padding,
                feature_group_count=groups,
                dtype=self.dtype,
                name=name,
            )(x)
            return nn.relu(x)

        def pool(x):
            return nn.max_pool(x, (3, 3), (2, 2), padding=ceil_mode_padding(x.shape[1:3], 3, 2))

        x = conv(x, 96, 11, 4, "VALID", 1, "conv1")  # [N, 55, 55, 96]
        x = pool(local_response_norm(x))  # [N, 27, 27, 96]
        x = conv(x, 256, 5, 1, 2, 2, "conv2")
        x = pool(local_response_norm(x))  # [N, 13, 13, 256]
        x = conv(x, 384, 3, 1, 1, 1, "conv3")
        x = conv(x, 384, 3, 1, 1, 2, "conv4")
        x = conv(x, 256, 3, 1, 1, 2, "conv5")
        x = pool(x)  # [N, 6, 6, 256]
        x = x.reshape(x.shape[0], -1)  # HWC flattening, as the converted fc6 weights expect
        x = nn.relu(nn.Dense(4096, dtype=self.dtype, name="fc6")(x))
        x = nn.Dropout(self.dropout, deterministic=not train, name="drop6")(x)
        x = nn.relu(nn.Dense(4096, dtype=self.dtype, name="fc7")(x))
        x = nn.Dropout(self.dropout, deterministic=not train, name="drop7")(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc8")(x)
        return x.astype(jnp.float32)
