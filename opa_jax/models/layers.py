"""Layers the zoo's architectures share: input normalisation, conv-BN-ReLU, Caffe's
ceil-mode pooling and local response normalisation."""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
from jax import lax


def normalize(images, mean, std, dtype):
    """Per-channel standardisation of RGB pixels 0-255, cast to the compute dtype."""
    return ((images - jnp.asarray(mean)) / jnp.asarray(std)).astype(dtype)


def scaled(width: float, features: int) -> int:
    """A hidden layer's width under the width multiplier (at least 1 unit)."""
    return max(1, round(features * width))


def conv_bn_relu(x, features, kernel, name, *, batch_norm, train, dtype, stride=1, padding=None):
    """Conv (no bias when followed by batch norm), optional batch norm, ReLU."""
    padding = kernel // 2 if padding is None else padding
    x = nn.Conv(
        features,
        (kernel, kernel),
        strides=stride,
        padding=padding,
        use_bias=not batch_norm,
        dtype=dtype,
        name=name,
    )(x)
    if batch_norm:
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=dtype,
            name=f"{name}_bn",
        )(x)
    return nn.relu(x)


def ceil_mode_padding(spatial, kernel: int, stride: int):
    """Right/bottom padding that makes an unpadded pool give Caffe's ceil-mode size.

    Caffe: out = ceil((size - kernel) / stride) + 1; the extra window is clipped
    at the border (max ignores it, average divides by the in-image count).
    """
    pads = []
    for size in spatial:
        out = math.ceil((size - kernel) / stride) + 1
        pads.append((0, max(0, (out - 1) * stride + kernel - size)))
    return tuple(pads)


def local_response_norm(x, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0):
    """Caffe's across-channel LRN: x / (k + alpha/size * sum_window x^2) ** beta.

    The window spans `size` channels centred on each channel, clipped at the ends.
    """
    squares = jnp.square(x.astype(jnp.float32))
    half = (size - 1) // 2
    window_sum = lax.reduce_window(
        squares,
        0.0,
        lax.add,
        (1, 1, 1, size),
        (1, 1, 1, 1),
        ((0, 0), (0, 0), (0, 0), (half, size - 1 - half)),
    )
    scale = (k + (alpha / size) * window_sum) ** beta
    return (x / scale).astype(x.dtype)
