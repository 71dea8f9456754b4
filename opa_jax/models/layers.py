"""Layers the zoo's architectures share: input normalisation, conv-BN-ReLU, Caffe's
ceil-mode pooling and local response normalisation, and convolution and max
pooling with gradients that run fast on XLA's CPU backend.

XLA's CPU backend runs a convolution's forward pass fast, but its kernel
gradient (a convolution that contracts over the batch) and max pooling's
gradient (`select_and_scatter`) slowly: with them a NiN train step cost 11.5
forward passes (issue 15, docs/models.md). `fast_conv` and `fast_max_pool`
give the values and gradients of the plain `lax` operations by other routes,
through `jax.custom_vjp`:

- `fast_conv` (and `conv_general_dilated`, its drop-in for `nn.Conv`): the
  kernel gradient is an im2col matrix product, the input gradient a
  transposed convolution; 1x1 convolutions are matrix products both ways. A
  stride-1 convolution on a map so small that most of its products would read
  the padding (VGG16's 4x4 and 2x2 maps) is one matrix product per kernel tap
  over the outputs that tap reads in the image, forward and backward
  (`_valid_taps_conv`).
- `fast_max_pool`: each output's cotangent goes to the first maximum of its
  window (as `select_and_scatter` sends it), with one strided slice and one
  interior-padded copy per window offset, and no scatter.

The zoo's modules use them unless built with `fast_gradients=False` (the
plain operations, for comparison), so `jax.grad` through `module.apply(...,
train=True)` is fast for any caller. Custom VJPs have no forward-mode
derivative: `jax.jvp` needs the plain operations (`fast_gradients=False`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def normalize(images, mean, std, dtype):
    """Per-channel standardisation of pixels 0-255, cast to the compute dtype."""
    return ((images - jnp.asarray(mean)) / jnp.asarray(std)).astype(dtype)


def scaled(width: float, features: int) -> int:
    """A hidden layer's width under the width multiplier (at least 1 unit)."""
    return max(1, round(features * width))


def conv(features, kernel, name, *, dtype, fast_gradients, **options) -> nn.Conv:
    """A square `nn.Conv`; with `fast_gradients`, through `conv_general_dilated` below
    (the same values, and gradients that are fast on the CPU)."""
    backend = conv_general_dilated if fast_gradients else None
    return nn.Conv(
        features, (kernel, kernel), dtype=dtype, conv_general_dilated=backend, name=name, **options
    )


def conv_bn_relu(
    x, features, kernel, name, *, batch_norm, train, dtype, fast_gradients, stride=1, padding=None
):
    """Conv (no bias when followed by batch norm), optional batch norm, ReLU.

    Without batch norm the kernel starts from He's initialisation (variance 2 / fan-in),
    which keeps the activations' scale through a stack of ReLUs; flax's default (LeCun,
    1 / fan-in) halves their variance at every layer, and a network as deep as NiN
    then barely learns. With batch norm the default is kept."""
    padding = kernel // 2 if padding is None else padding
    init = {} if batch_norm else {"kernel_init": nn.initializers.he_normal()}
    x = conv(
        features,
        kernel,
        name,
        dtype=dtype,
        fast_gradients=fast_gradients,
        strides=stride,
        padding=padding,
        use_bias=not batch_norm,
        **init,
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


def max_pool(x, window: int, stride: int, padding, *, fast_gradients):
    """`nn.max_pool` over square windows; with `fast_gradients`, `fast_max_pool`."""
    pool = fast_max_pool if fast_gradients else nn.max_pool
    return pool(x, (window, window), (stride, stride), padding=padding)


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


# ----------------------------------------------------------------------------- fast gradients

NHWC_DIMENSIONS = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), ("NHWC", "HWIO", "NHWC"))
# im2col over whole windows when a window's inputs (kh * kw * C) are at most this many;
# otherwise one matrix product per kernel row (less memory traffic).
FULL_IM2COL_MAX_COLUMNS = 256
# A stride-1 convolution whose (output position, kernel tap) pairs read the padding more
# often than this computes only the taps that read the image, one matrix product per tap
# (`_valid_taps_conv`). VGG16's 3x3 convolutions at batch 400 on this project's CPU
# (docs/benchmarks.md): 4x4 maps read 31% padding and run 1.3x as fast this way, 2x2 maps
# (56%) 2.5x as fast as whole-window im2col; 8x8 maps (16%) run as fast either way.
VALID_TAPS_MIN_PADDING_SHARE = 0.25

Padding = tuple[tuple[int, int], ...]

_valid_taps_on = True  # `valid_taps_route` sets it while a function traces


def valid_taps_route(fn, enabled: bool):
    """`fn` traced with the valid-taps route on or off (off: every convolution on its
    previous route, the plain convolution or im2col): what benchmarks compare. A jitted
    `fn` is unwrapped, so that its cached trace is not reused."""
    inner = getattr(fn, "__wrapped__", fn)

    @functools.wraps(inner)
    def traced(*args, **kwargs):
        global _valid_taps_on
        previous, _valid_taps_on = _valid_taps_on, enabled
        try:
            return inner(*args, **kwargs)
        finally:
            _valid_taps_on = previous

    return traced


def _strided_window(padded, offset, strides, out_spatial):
    """padded[:, oh + s*i, ow + s*j, :] for every output position (i, j): [N, Ho, Wo, C]."""
    start = (0, *offset, 0)
    limit = (
        padded.shape[0],
        *(o + (n - 1) * s + 1 for o, n, s in zip(offset, out_spatial, strides, strict=True)),
        padded.shape[3],
    )
    return lax.slice(padded, start, limit, (1, *strides, 1))


def _pad_spatial(x, padding: Padding, value=0):
    return lax.pad(
        x, jnp.asarray(value, x.dtype), ((0, 0, 0), *((lo, hi, 0) for lo, hi in padding), (0, 0, 0))
    )


def _plain_conv(images, kernel, strides, padding):
    return lax.conv_general_dilated(
        images, kernel, strides, padding, dimension_numbers=NHWC_DIMENSIONS
    )


def _is_pointwise(kernel, padding) -> bool:
    return kernel.shape[:2] == (1, 1) and all(p == (0, 0) for p in padding)


def _accumulation_type(dtype):
    """At least float32: bfloat16 products are summed in float32."""
    return jnp.promote_types(dtype, jnp.float32)


def _matmul(a, b, dtype):
    """a @ b over the last axis of `a`, accumulated in at least float32, cast to `dtype`."""
    dimensions = (((a.ndim - 1,), (0,)), ((), ()))
    accumulate = _accumulation_type(a.dtype)
    return lax.dot_general(a, b, dimensions, preferred_element_type=accumulate).astype(dtype)


def _contract_batch(a, b, dtype):
    """sum over all leading axes of a[..., i] * b[..., j] -> [i, j], accumulated in at
    least float32."""
    a = a.reshape(-1, a.shape[-1])  # [rows, i]
    b = b.reshape(-1, b.shape[-1])  # [rows, j]
    accumulate = _accumulation_type(a.dtype)
    return lax.dot_general(
        a, b, (((0,), (0,)), ((), ())), preferred_element_type=accumulate
    ).astype(dtype)


def _is_smaller_than_kernel(images_shape, kernel_shape) -> bool:
    """Most of the kernel's taps fall in the padding (VGG's 3x3 convs on 2x2 and 1x1
    maps): XLA's CPU convolution takes a slow generic loop there (9 s instead of
    0.1 s for a batch of 128 at 2x2x512, issue 15), matrix products do not."""
    return kernel_shape[0] > images_shape[1] or kernel_shape[1] > images_shape[2]


def _valid_outputs(size: int, lo: int, out: int, tap: int) -> tuple[int, int]:
    """The outputs [first, last) of a stride-1 axis whose kernel tap `tap` reads the image
    (not the padding): input index o + tap - lo in [0, size)."""
    return max(0, lo - tap), min(out, size + lo - tap)


def _padding_share(images_shape, kernel_shape, strides, padding) -> float:
    """The share of a stride-1 convolution's (output position, kernel tap) pairs that read
    the padding; 0 for strided convolutions, which this module does not decompose."""
    if tuple(strides) != (1, 1):
        return 0.0
    out_spatial = _out_spatial(images_shape, kernel_shape, strides, padding)
    read, total = 1, 1
    for size, (lo, _), out, extent in zip(
        images_shape[1:3], padding, out_spatial, kernel_shape[:2], strict=True
    ):
        read *= sum(
            max(0, b - a) for a, b in (_valid_outputs(size, lo, out, t) for t in range(extent))
        )
        total *= out * extent
    return 1.0 - read / total if total else 0.0


def _valid_taps_conv(images, kernel, padding):
    """A stride-1 convolution as one matrix product per kernel tap over only the outputs
    whose input that tap reads inside the image, each padded into place and summed.

    The same values as the convolution (up to the order of the sums) without the
    products with the padding's zeros; made of slices, matrix products, pads and adds,
    so its gradients are of the same kind (no custom VJP).
    """
    out_spatial = _out_spatial(images.shape, kernel.shape, (1, 1), padding)
    (lo_h, _), (lo_w, _) = padding
    accumulate = _accumulation_type(images.dtype)  # the taps are summed in it, then cast
    zero = jnp.zeros((), accumulate)
    out = None
    for i in range(kernel.shape[0]):
        rows = _valid_outputs(images.shape[1], lo_h, out_spatial[0], i)
        for j in range(kernel.shape[1]):
            cols = _valid_outputs(images.shape[2], lo_w, out_spatial[1], j)
            if rows[1] <= rows[0] or cols[1] <= cols[0]:
                continue  # this tap reads only padding
            window = images[
                :, rows[0] + i - lo_h : rows[1] + i - lo_h, cols[0] + j - lo_w : cols[1] + j - lo_w
            ]
            product = _matmul(window, kernel[i, j], accumulate)
            config = (
                (0, 0, 0),
                (rows[0], out_spatial[0] - rows[1], 0),
                (cols[0], out_spatial[1] - cols[1], 0),
                (0, 0, 0),
            )
            product = lax.pad(product, zero, config)
            out = product if out is None else out + product
    if out is None:  # every tap in the padding
        out = jnp.zeros((images.shape[0], *out_spatial, kernel.shape[-1]), accumulate)
    return out.astype(images.dtype)


def _out_spatial(images_shape, kernel_shape, strides, padding) -> tuple[int, int]:
    return tuple(
        (size + lo + hi - k) // s + 1
        for size, (lo, hi), k, s in zip(
            images_shape[1:3], padding, kernel_shape[:2], strides, strict=True
        )
    )


def _im2col(images, kernel_shape, strides, padding):
    """The input window of every output position: [N, Ho, Wo, kh * kw * C], columns
    ordered (i, j, c) like the rows of the kernel reshaped to [kh * kw * C, O]."""
    out_spatial = _out_spatial(images.shape, kernel_shape, strides, padding)
    padded = _pad_spatial(images, padding)
    windows = [
        _strided_window(padded, (i, j), strides, out_spatial)
        for i in range(kernel_shape[0])
        for j in range(kernel_shape[1])
    ]
    return jnp.concatenate(windows, axis=-1)


def col2im(patch_grads, images_shape, kernel_shape, strides, padding):
    """The transpose of `_im2col`: each window column added back where it was read.

    patch_grads [N, Ho, Wo, kh * kw * C], columns ordered (i, j, c); images_shape
    [N, H, W, C]; kernel_shape [kh, kw, C, ...]. Also the incremental evaluator's
    delta convolutions (opa_jax/incremental/rules.py).
    """
    kh, kw, channels, _ = kernel_shape
    out_spatial = patch_grads.shape[1:3]
    padded_spatial = tuple(
        size + lo + hi for size, (lo, hi) in zip(images_shape[1:3], padding, strict=True)
    )
    zero = jnp.zeros((), patch_grads.dtype)
    grad = jnp.zeros((images_shape[0], *padded_spatial, channels), patch_grads.dtype)
    for index, offset in enumerate((i, j) for i in range(kh) for j in range(kw)):
        column = patch_grads[..., index * channels : (index + 1) * channels]
        grad = grad + lax.pad(column, zero, _spread(offset, padded_spatial, out_spatial, strides))
    (top, _), (left, _) = padding
    return grad[:, top : top + images_shape[1], left : left + images_shape[2]]


def _spread(offset, padded_spatial, out_spatial, strides):
    """lax.pad's config that puts output (i, j) at padded position offset + stride * (i, j)."""
    return (
        (0, 0, 0),
        *(
            (o, size - o - (n - 1) * s - 1, s - 1)
            for o, size, n, s in zip(offset, padded_spatial, out_spatial, strides, strict=True)
        ),
        (0, 0, 0),
    )


def _conv_forward(images, kernel, strides, padding):
    if _is_pointwise(kernel, padding):
        if strides != (1, 1):
            images = images[:, :: strides[0], :: strides[1]]
        return _matmul(images, kernel[0, 0], images.dtype)
    if _is_smaller_than_kernel(images.shape, kernel.shape):
        patches = _im2col(images, kernel.shape, strides, padding)
        return _matmul(patches, kernel.reshape(-1, kernel.shape[-1]), images.dtype)
    return _plain_conv(images, kernel, strides, padding)


def _kernel_gradient(images, cotangent, kernel_shape, strides, padding, dtype):
    """d loss / d kernel [kh, kw, C, O]: im2col patches contracted with the cotangent."""
    kh, kw, channels, features = kernel_shape
    out_spatial = cotangent.shape[1:3]
    if (kh, kw) == (1, 1) and all(p == (0, 0) for p in padding):
        windows = _strided_window(images, (0, 0), strides, out_spatial)
        return _contract_batch(windows, cotangent, dtype).reshape(kernel_shape)
    if kh * kw * channels <= FULL_IM2COL_MAX_COLUMNS or _is_smaller_than_kernel(
        images.shape, kernel_shape
    ):
        patches = _im2col(images, kernel_shape, strides, padding)
        return _contract_batch(patches, cotangent, dtype).reshape(kernel_shape)
    padded = _pad_spatial(images, padding)
    # One product per kernel row: the row's kw shifted copies side by side, then a
    # strided row slice for each i.
    row_patches = jnp.concatenate(
        [
            _strided_window(padded, (0, j), (1, strides[1]), (padded.shape[1], out_spatial[1]))
            for j in range(kw)
        ],
        axis=-1,
    )  # [N, Hp, Wo, kw * C]
    rows = [
        _contract_batch(
            _strided_window(row_patches, (i, 0), (strides[0], 1), out_spatial), cotangent, dtype
        )
        for i in range(kh)
    ]  # kh x [kw * C, O]
    return jnp.stack(rows).reshape(kernel_shape)


def _input_gradient(kernel, cotangent, images_shape, strides, padding):
    if _is_pointwise(kernel, padding) and strides == (1, 1):
        return _matmul(cotangent, kernel[0, 0].T, cotangent.dtype)
    if _is_smaller_than_kernel(images_shape, kernel.shape):
        patch_grads = _matmul(cotangent, kernel.reshape(-1, kernel.shape[-1]).T, cotangent.dtype)
        return col2im(patch_grads, images_shape, kernel.shape, strides, padding)
    images = jax.ShapeDtypeStruct(images_shape, cotangent.dtype)
    (grad,) = jax.linear_transpose(lambda x: _plain_conv(x, kernel, strides, padding), images)(
        cotangent
    )
    return grad


def fast_conv(images, kernel, strides: Sequence[int] = (1, 1), padding: Padding = ((0, 0), (0, 0))):
    """NHWC images [N, H, W, C] with an HWIO kernel [kh, kw, C, O] -> [N, Ho, Wo, O].

    The values of `lax.conv_general_dilated`, with gradients that avoid XLA's
    CPU backward convolutions (see the module docstring).
    """
    strides, padding = tuple(strides), tuple(tuple(p) for p in padding)
    share = _padding_share(images.shape, kernel.shape, strides, padding)
    if _valid_taps_on and share > VALID_TAPS_MIN_PADDING_SHARE:
        return _valid_taps_conv(images, kernel, padding)  # its own gradients are fast
    return _conv_vjp(images, kernel, strides, padding)


def _conv_vjp_fwd(images, kernel, strides, padding):
    return _conv_forward(images, kernel, strides, padding), (images, kernel)


def _conv_vjp_bwd(strides, padding, residuals, cotangent):
    images, kernel = residuals
    cotangent = cotangent.astype(images.dtype)
    grad_kernel = _kernel_gradient(images, cotangent, kernel.shape, strides, padding, kernel.dtype)
    grad_images = _input_gradient(kernel, cotangent, images.shape, strides, padding)
    return grad_images, grad_kernel


def _conv_vjp_impl(images, kernel, strides, padding):
    return _conv_forward(images, kernel, strides, padding)


_conv_vjp = jax.custom_vjp(_conv_vjp_impl, nondiff_argnums=(2, 3))
_conv_vjp.defvjp(_conv_vjp_fwd, _conv_vjp_bwd)


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
):
    """`lax.conv_general_dilated`'s signature, for `nn.Conv(conv_general_dilated=...)`.

    2-D NHWC convolutions without dilation, groups or precision options take
    `fast_conv`; any other call is passed to lax unchanged.
    """
    plain = (
        lhs.ndim == 4
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and feature_group_count == 1
        and batch_group_count == 1
        and precision is None
        and preferred_element_type is None
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == NHWC_DIMENSIONS
    )
    if not plain:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation,
            rhs_dilation,
            dimension_numbers,
            feature_group_count,
            batch_group_count,
            precision,
            preferred_element_type,
        )
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    return fast_conv(lhs, rhs, window_strides, padding)


def _max_pool_forward(images, window, strides, padding):
    return lax.reduce_window(
        images,
        jnp.asarray(-jnp.inf, images.dtype),
        lax.max,
        (1, *window, 1),
        (1, *strides, 1),
        ((0, 0), *padding, (0, 0)),
    )


def _max_pool_fwd(images, window, strides, padding):
    pooled = _max_pool_forward(images, window, strides, padding)
    return pooled, (images, pooled)


def _max_pool_bwd(window, strides, padding, residuals, cotangent):
    """Each output's cotangent goes to the first maximum of its window (row-major), as
    XLA's select_and_scatter with `>=` picks it; one term per window offset."""
    images, pooled = residuals
    padded = _pad_spatial(images, padding, -jnp.inf)  # [N, Hp, Wp, C]
    out_spatial = pooled.shape[1:3]
    taken = jnp.zeros(pooled.shape, bool)
    zero = jnp.zeros((), cotangent.dtype)
    grad = jnp.zeros(padded.shape, cotangent.dtype)
    for i in range(window[0]):
        for j in range(window[1]):
            hit = (_strided_window(padded, (i, j), strides, out_spatial) == pooled) & ~taken
            taken = taken | hit
            routed = jnp.where(hit, cotangent, zero)  # [N, Ho, Wo, C]
            spread = _spread((i, j), padded.shape[1:3], out_spatial, strides)
            grad = grad + lax.pad(routed, zero, spread)
    (top, _), (left, _) = padding
    return (grad[:, top : top + images.shape[1], left : left + images.shape[2]],)


_max_pool_vjp = jax.custom_vjp(_max_pool_forward, nondiff_argnums=(1, 2, 3))
_max_pool_vjp.defvjp(_max_pool_fwd, _max_pool_bwd)


def fast_max_pool(
    images,
    window: Sequence[int],
    strides: Sequence[int] | None = None,
    padding: str | Sequence[tuple[int, int]] = "VALID",
):
    """`flax.linen.max_pool` on NHWC images [N, H, W, C], with a scatter-free gradient."""
    window = tuple(window)
    strides = tuple(strides) if strides is not None else (1,) * len(window)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(images.shape[1:3], window, strides, padding)
    return _max_pool_vjp(images, window, strides, tuple(tuple(p) for p in padding))
