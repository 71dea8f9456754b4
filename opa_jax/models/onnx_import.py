"""ONNX image classifiers (PyTorch's `torch.onnx.export`, tf2onnx, ...) as a pure JAX function.

`load_onnx_model(path)` reads the graph once and returns `apply_fn(params,
images) -> logits`, one interpreter over the ONNX nodes, with every float
weight in `params`. The same interpreter runs twice: once at load, under
`jax.eval_shape`, where each node converts its weights and records them (this
also checks shapes and operators before anything is returned), and then inside
the attack's jit, where each node reads them back from `params`.

NCHW graphs run channels-last: the images enter NHWC and stay so. A value
carries its layout: `plain` (as the graph sees it, any rank: a transformer's
token tensors `[N, T, C]` are plain), `nhwc` (a 4-D NCHW value stored
channels-last), `nlc` (a 3-D `[N, C, L]` value stored `[N, L, C]`: a map whose
H and W were flattened, as a ViT's patch embedding writes `x.flatten(2)`, so
that the Transpose to tokens moves no data) or `flat` (`[N, C*H*W]` flattened
from an NCHW value, stored in H, W, C order). Weights are converted once, at
load, to the layout of what they meet: Conv kernels OIHW -> HWIO,
per-channel constants `[C, 1, 1]` -> `[C]`, and the rows of a Gemm/MatMul
weight after a Flatten are permuted from C, H, W to H, W, C order, so no
activation is transposed on the way. Shape arithmetic (Shape, Gather, Concat,
... on constants) runs in NumPy while tracing, so a dynamic batch axis costs
nothing; so do masks built from constants.

The input convention (pixel scale, mean, std, channel order) comes from
`opa_jax.models.convention`; by default the graph gets float RGB pixels 0-255.
The channel count is the graph's (3, or 1 for a grayscale graph), the last
axis of `LoadedModel.image_shape`. A trailing Softmax (or LogSoftmax) is
dropped, so the model returns logits.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from opa_jax.errors import InputError
from opa_jax.models import convention as convention_lib
from opa_jax.models import importing
from opa_jax.models.base import LoadedModel
from opa_jax.models.convention import InputConvention

PLAIN, NHWC, NLC, FLAT = "plain", "nhwc", "nlc", "flat"
HIGHEST = jax.lax.Precision.HIGHEST  # parity also on accelerators with TF32 matmuls

_error = functools.partial(importing.error, "onnx")  # (path, message) -> InputError
IN_MEMORY = "<memory>"  # the name of a model given as bytes or a ModelProto


@dataclasses.dataclass(frozen=True)
class Value:
    """One tensor of the graph: NumPy when known while tracing (static), else a JAX array."""

    data: Any
    layout: str = PLAIN
    chw: tuple[int, int, int] | None = None  # FLAT: the (C, H, W) it was flattened from

    @property
    def static(self) -> bool:
        return isinstance(self.data, np.ndarray | np.generic)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape the graph sees."""
        if self.layout == NHWC:
            n, h, w, c = self.data.shape
            return (n, c, h, w)
        if self.layout == NLC:
            n, length, c = self.data.shape
            return (n, c, length)
        return tuple(self.data.shape)


@dataclasses.dataclass(frozen=True)
class Node:
    name: str
    op_type: str
    inputs: tuple[str, ...]  # '' for an omitted optional input
    outputs: tuple[str, ...]
    attrs: dict  # attribute values as Python ints, floats, strings, tuples or NumPy arrays
    opset: int  # of the default domain, for the operators whose form changed


@dataclasses.dataclass(frozen=True)
class Graph:
    path: str
    nodes: tuple[Node, ...]  # topological order, only those the output depends on
    constants: dict  # initializer name -> np.ndarray
    input_name: str
    nchw: bool  # the graph's input is [N, 3, H, W]
    output_name: str


class NodeError(Exception):
    """A node cannot run as given; becomes an InputError naming the file and node."""


class Weights:
    """A node's float constants as parameters, converted to their layout once.

    Loading, first pass (`params=None`): `get` builds the array and records it
    under the node's name. Second pass, on another batch size (`against` the
    first pass's records): `get` builds it again and notes in `inline` those that
    changed, i.e. that depend on the batch size (a constant fill of shape
    [N, ...] where a graph folds shape arithmetic). Running: `get` reads it
    from `params`, or builds an `inline` one from the graph's constants.
    """

    def __init__(self, params: dict | None = None, inline=frozenset(), against=None):
        self.params, self.inline, self.against = params, inline, against
        self.collected: dict[str, dict[str, np.ndarray]] = {}

    def get(self, node: Node, key: str, make: Callable[[], np.ndarray] | np.ndarray):
        if self.params is not None and (node.name, key) not in self.inline:
            return self.params[node.name][key]
        array = np.asarray(make() if callable(make) else make, np.float32)
        if self.against is not None:
            before = self.against.get(node.name, {}).get(key)
            if before is None or not np.array_equal(before, array, equal_nan=True):
                self.inline = self.inline | {(node.name, key)}
        elif self.params is None:
            self.collected.setdefault(node.name, {})[key] = array
        return array


# ---------------------------------------------------------------------------------------------
# Layout helpers


def plain(value: Value):
    """The value's data as the graph sees it (transposed back if stored channels-last)."""
    if value.layout == NHWC:
        return jnp.transpose(value.data, (0, 3, 1, 2))
    if value.layout == NLC:
        return jnp.transpose(value.data, (0, 2, 1))
    if value.layout == FLAT:
        c, h, w = value.chw
        n = value.data.shape[0]
        return jnp.transpose(value.data.reshape(n, h, w, c), (0, 3, 1, 2)).reshape(n, -1)
    return value.data


def channels_last(value: Value, node: Node):
    """A 4-D activation stored NHWC (plain NCHW values are transposed, once per call)."""
    if value.layout == NHWC:
        return value.data
    if value.layout == PLAIN and len(value.shape) == 4:
        return jnp.transpose(jnp.asarray(value.data), (0, 2, 3, 1))
    raise NodeError(f"expected a 4-D [N, C, H, W] input; got shape {list(value.shape)}")


def to_layout(array: np.ndarray, like: Value) -> np.ndarray | None:
    """A constant that broadcasts against `like` (graph view), in `like`'s storage; None if
    it cannot be (the caller then works on the plain values)."""
    if like.layout == NHWC:
        if array.ndim > 4:
            return None
        return array.reshape((1,) * (4 - array.ndim) + array.shape).transpose(0, 2, 3, 1)
    if like.layout == NLC:
        if array.ndim > 3:
            return None
        return array.reshape((1,) * (3 - array.ndim) + array.shape).transpose(0, 2, 1)
    if like.layout == FLAT:
        if array.ndim > 2:
            return None
        if array.size == 1 or array.shape[-1] == 1:
            return array
        c, h, w = like.chw
        return np.moveaxis(array.reshape(*array.shape[:-1], c, h, w), -3, -1).reshape(array.shape)
    return array


def flat_rows(matrix: np.ndarray, chw: tuple[int, int, int]) -> np.ndarray:
    """A [C*H*W, M] weight's rows from C, H, W order to the H, W, C order of a FLAT value."""
    c, h, w = chw
    return matrix.reshape(c, h, w, -1).transpose(1, 2, 0, 3).reshape(matrix.shape)


def static(value: Value | None, what: str) -> np.ndarray:
    if value is None:
        raise NodeError(f"{what} is missing")
    if not value.static:
        raise NodeError(
            f"{what} depends on the image's values (a dynamic shape that cannot be fixed); "
            "expected a constant (arithmetic on the input's shape, as x.view(x.size(0), -1) "
            "exports, is fine)"
        )
    return value.data


def float_operand(weights: Weights, node: Node, key: str, value: Value):
    """A static float operand as a parameter; other values as they are."""
    if not value.static or not np.issubdtype(value.data.dtype, np.floating):
        return value.data
    return weights.get(node, key, value.data)


# ---------------------------------------------------------------------------------------------
# Operators: handler(node, inputs, weights) -> outputs; inputs and outputs are Values


def _pairs(node: Node, name: str, default: int) -> tuple[int, int]:
    values = tuple(node.attrs.get(name, (default, default)))
    if len(values) != 2:
        raise NodeError(f"{name}={list(values)}; only 2-D (H, W) operations are supported")
    return values


def _spatial_padding(node: Node, in_hw, kernel, strides, dilations) -> list[tuple[int, int]]:
    """(begin, end) padding per spatial axis from `auto_pad` and `pads`."""
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, k, s, d in zip(in_hw, kernel, strides, dilations, strict=True):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            pads.append((small, large) if auto_pad == "SAME_UPPER" else (large, small))
        return pads
    if auto_pad == "VALID":
        return [(0, 0), (0, 0)]
    if auto_pad != "NOTSET":
        raise NodeError(f"auto_pad={auto_pad!r}; expected NOTSET, SAME_UPPER, SAME_LOWER or VALID")
    pads = tuple(node.attrs.get("pads", (0, 0, 0, 0)))
    if len(pads) != 4:
        raise NodeError(f"pads={list(pads)}; only 2-D (H, W) operations are supported")
    return [(pads[0], pads[2]), (pads[1], pads[3])]


def op_conv(node: Node, inputs, weights: Weights):
    x = channels_last(inputs[0], node)
    kernel_oihw = static(inputs[1], "the weight W")
    if kernel_oihw.ndim != 4:
        raise NodeError(f"weight of shape {list(kernel_oihw.shape)}; only 2-D convolutions")
    groups = node.attrs.get("group", 1)
    if x.shape[-1] != kernel_oihw.shape[1] * groups:
        raise NodeError(
            f"input has {x.shape[-1]} channels; the weight {list(kernel_oihw.shape)} with "
            f"group={groups} expects {kernel_oihw.shape[1] * groups}"
        )
    strides, dilations = _pairs(node, "strides", 1), _pairs(node, "dilations", 1)
    kernel_hw = kernel_oihw.shape[2:]
    padding = _spatial_padding(node, x.shape[1:3], kernel_hw, strides, dilations)
    kernel = weights.get(node, "kernel", lambda: kernel_oihw.transpose(2, 3, 1, 0))  # HWIO
    y = jax.lax.conv_general_dilated(
        x,
        kernel,
        strides,
        padding,
        rhs_dilation=dilations,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
        precision=HIGHEST,
    )
    if len(inputs) > 2 and inputs[2] is not None:
        y = y + weights.get(node, "bias", static(inputs[2], "the bias B"))
    return [Value(y, NHWC)]


def _pool_geometry(node: Node, in_hw):
    """Window, strides, dilations and (begin, end) padding per axis, with ceil_mode's extra
    end padding; `explicit` is the padding without that extra (for count_include_pad)."""
    kernel = _pairs(node, "kernel_shape", 1)
    strides, dilations = _pairs(node, "strides", 1), _pairs(node, "dilations", 1)
    explicit = _spatial_padding(node, in_hw, kernel, strides, dilations)
    padding = []
    for size, k, s, d, (lo, hi) in zip(in_hw, kernel, strides, dilations, explicit, strict=True):
        span = (k - 1) * d + 1
        if node.attrs.get("ceil_mode", 0):
            out = math.ceil((size + lo + hi - span) / s) + 1
            if (out - 1) * s >= size + lo:  # the last window must start inside the input
                out -= 1
        else:
            out = (size + lo + hi - span) // s + 1
        if out < 1:
            raise NodeError(f"a {k}-wide window does not fit an input of {size} with {lo, hi} pad")
        extra = max(0, (out - 1) * s + span - (size + lo + hi))
        padding.append((lo, hi + extra))
    return kernel, strides, dilations, padding, explicit


def _pool_windows(x, init, op, kernel, strides, dilations, padding):
    """`jax.lax.reduce_window` of `op` over the spatial windows of NHWC `x`."""
    window, step, dilation = ((1, *v, 1) for v in (kernel, strides, dilations))
    padding = [(0, 0), *padding, (0, 0)]
    return jax.lax.reduce_window(x, init, op, window, step, padding, window_dilation=dilation)


def op_max_pool(node: Node, inputs, weights: Weights):
    if any(node.outputs[1:]):
        raise NodeError("the Indices output is used; only the pooled values are supported")
    x = channels_last(inputs[0], node)
    kernel, strides, dilations, padding, _ = _pool_geometry(node, x.shape[1:3])
    y = _pool_windows(x, -jnp.inf, jax.lax.max, kernel, strides, dilations, padding)
    return [Value(y, NHWC)]


def _window_counts(size, k, s, d, padding, explicit, include_pad: bool) -> np.ndarray:
    """How many elements each output window averages over, along one axis."""
    (lo, hi), (_, explicit_hi) = padding, explicit
    inside = np.ones(size)
    if include_pad:  # the explicit padding counts, ceil_mode's extra does not
        mask = np.concatenate(
            [np.ones(lo), inside, np.ones(explicit_hi), np.zeros(hi - explicit_hi)]
        )
    else:
        mask = np.concatenate([np.zeros(lo), inside, np.zeros(hi)])
    span = (k - 1) * d + 1
    out = (len(mask) - span) // s + 1
    return np.asarray([mask[o * s : o * s + span : d].sum() for o in range(out)])


def op_average_pool(node: Node, inputs, weights: Weights):
    x = channels_last(inputs[0], node)
    kernel, strides, dilations, padding, explicit = _pool_geometry(node, x.shape[1:3])
    sums = _pool_windows(x, 0.0, jax.lax.add, kernel, strides, dilations, padding)
    include_pad = bool(node.attrs.get("count_include_pad", 0))
    counts_h, counts_w = (
        _window_counts(size, k, s, d, pad, exp, include_pad)
        for size, k, s, d, pad, exp in zip(
            x.shape[1:3], kernel, strides, dilations, padding, explicit, strict=True
        )
    )
    counts = np.outer(counts_h, counts_w)[None, :, :, None].astype(np.float32)
    return [Value(sums / counts, NHWC)]


def op_global_average_pool(node: Node, inputs, weights: Weights):
    return [Value(jnp.mean(channels_last(inputs[0], node), axis=(1, 2), keepdims=True), NHWC)]


def op_global_max_pool(node: Node, inputs, weights: Weights):
    return [Value(jnp.max(channels_last(inputs[0], node), axis=(1, 2), keepdims=True), NHWC)]


def op_batch_norm(node: Node, inputs, weights: Weights):
    if node.attrs.get("training_mode", 0):
        raise NodeError("training_mode=1; expected an inference graph (model.eval())")
    if any(node.outputs[1:]):
        raise NodeError("its running-statistics outputs are used; expected an inference graph")
    x = inputs[0]
    names = ("scale", "B", "input_mean", "input_var")
    scale, bias, mean, var = (static(v, what) for v, what in zip(inputs[1:5], names, strict=True))
    epsilon = node.attrs.get("epsilon", 1e-5)
    rank = len(x.shape)
    if rank < 2 or x.shape[1] != scale.shape[0]:
        raise NodeError(
            f"input shape {list(x.shape)}; expected {scale.shape[0]} channels on axis 1"
        )
    per_channel = (-1,) + (1,) * (rank - 2)  # broadcasts over the graph's [N, C, ...]

    def param(key, make):
        return weights.get(node, key, lambda: to_layout(make().reshape(per_channel), x))

    multiplier = param("multiplier", lambda: scale / np.sqrt(var.astype(np.float64) + epsilon))
    y = (x.data - param("mean", lambda: mean)) * multiplier + param("bias", lambda: bias)
    return [dataclasses.replace(x, data=y)]


def op_gemm(node: Node, inputs, weights: Weights):
    a, b = inputs[0], inputs[1]
    alpha, beta = node.attrs.get("alpha", 1.0), node.attrs.get("beta", 1.0)
    trans_a, trans_b = node.attrs.get("transA", 0), node.attrs.get("transB", 0)
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise NodeError(f"inputs of shapes {list(a.shape)}, {list(b.shape)}; expected 2-D")
    y = _matmul(weights, node, a, b, trans_a=trans_a, trans_b=trans_b, alpha=alpha)
    if len(inputs) > 2 and inputs[2] is not None:
        c = inputs[2]
        if c.static:
            y = y + weights.get(node, "bias", lambda: beta * c.data.astype(np.float64))
        else:
            y = y + beta * plain(c)
    return [Value(y)]


def op_matmul(node: Node, inputs, weights: Weights):
    """2-D as Gemm; with batch axes (attention, token MLPs) NumPy's broadcasting matmul."""
    a, b = inputs
    if len(a.shape) == 2 and len(b.shape) == 2:
        return [Value(_matmul(weights, node, a, b))]
    if a.static and b.static:
        return [Value(np.matmul(a.data, b.data))]
    lhs = float_operand(weights, node, "a", a) if a.static else plain(a)
    rhs = float_operand(weights, node, "kernel", b) if b.static else plain(b)
    return [Value(jnp.matmul(lhs, rhs, precision=HIGHEST))]


def _matmul(weights: Weights, node: Node, a: Value, b: Value, trans_a=0, trans_b=0, alpha=1.0):
    """a @ b for 2-D values; a static b becomes a [K, M] parameter, rows matching a FLAT a."""
    if b.static and not a.static:
        rows = b.data.shape[1] if trans_b else b.data.shape[0]
        if rows != (a.shape[0] if trans_a else a.shape[1]):
            raise NodeError(f"inputs of shapes {list(a.shape)}, {list(b.shape)} do not match")
        chw = a.chw if a.layout == FLAT and not trans_a else None

        def make():
            matrix = (b.data.T if trans_b else b.data).astype(np.float64) * alpha
            return flat_rows(matrix, chw) if chw else matrix

        lhs = a.data if chw else plain(a)
        lhs = lhs.T if trans_a else lhs
        return jnp.matmul(lhs, weights.get(node, "kernel", make), precision=HIGHEST)
    lhs, rhs = plain(a), plain(b)
    lhs, rhs = (lhs.T if trans_a else lhs), (rhs.T if trans_b else rhs)
    return alpha * jnp.matmul(lhs, rhs, precision=HIGHEST)


def _binary(numpy_fn, jax_fn):
    def handler(node: Node, inputs, weights: Weights):
        a, b = inputs
        if a.static and b.static:  # shape arithmetic, constant folding
            return [Value(np.asarray(numpy_fn(a.data, b.data)))]
        active = a if not a.static else b
        if a.static or b.static:
            constant = a if a.static else b
            stored = to_layout(constant.data, active)
            if stored is not None:
                key = "a" if a.static else "b"
                operand = (
                    weights.get(node, key, stored)
                    if np.issubdtype(stored.dtype, np.floating)
                    else stored
                )
                pair = (operand, active.data) if a.static else (active.data, operand)
                return [dataclasses.replace(active, data=jax_fn(*pair))]
        elif a.layout == b.layout and a.chw == b.chw and len(a.shape) == len(b.shape):
            return [dataclasses.replace(a, data=jax_fn(a.data, b.data))]
        lhs = float_operand(weights, node, "a", a) if a.static else plain(a)
        rhs = float_operand(weights, node, "b", b) if b.static else plain(b)
        return [Value(jax_fn(lhs, rhs))]

    return handler


def _integer_safe_divide(a, b):
    if np.issubdtype(np.result_type(a, b), np.integer):
        return np.trunc(np.asarray(a) / np.asarray(b)).astype(np.result_type(a, b))
    return np.divide(a, b)


def _unary(fn):
    def handler(node: Node, inputs, weights: Weights):
        return [dataclasses.replace(inputs[0], data=fn(node, jnp.asarray(inputs[0].data)))]

    return handler


def op_clip(node: Node, inputs, weights: Weights):
    x = inputs[0]
    if node.opset < 11:
        low, high = node.attrs.get("min", -np.inf), node.attrs.get("max", np.inf)
    else:
        bounds = [*inputs[1:3], None, None][:2]
        low, high = (
            float(static(v, f"the {what} bound")) if v is not None else default
            for v, what, default in zip(bounds, ("min", "max"), (-np.inf, np.inf), strict=True)
        )
    return [dataclasses.replace(x, data=jnp.clip(jnp.asarray(x.data), low, high))]


def op_identity(node: Node, inputs, weights: Weights):
    if node.op_type == "Dropout" and any(node.outputs[1:]):
        raise NodeError("its mask output is used; expected an inference graph")
    return [inputs[0]]


def _reshaped(in_shape, target, allowzero: bool) -> tuple[int, ...]:
    """ONNX Reshape's output shape: 0 copies the input's dimension, -1 is inferred."""
    out = [in_shape[i] if (d == 0 and not allowzero) else int(d) for i, d in enumerate(target)]
    if out.count(-1) > 1:
        raise NodeError(f"shape {list(target)} has more than one -1")
    if -1 in out:
        known = math.prod(d for d in out if d != -1)
        out[out.index(-1)] = math.prod(in_shape) // known if known else 0
    if math.prod(out) != math.prod(in_shape):
        raise NodeError(f"cannot reshape {list(in_shape)} to {list(target)}")
    return tuple(out)


def _flattened(value: Value, out_shape) -> Value:
    """A reshape that moves no data where the layouts allow: NHWC to [N, C*H*W] (FLAT) or
    [N, C, H*W] (NLC), and NLC back to [N, C, H, W]; else on the plain values."""
    if value.static or value.layout == PLAIN:  # any rank, scalars included
        return Value(value.data.reshape(out_shape))
    n = value.shape[0]
    if value.layout == NHWC and out_shape == (n, math.prod(value.shape[1:])):
        _, c, h, w = value.shape
        layout, chw = (PLAIN, None) if h == w == 1 else (FLAT, (c, h, w))
        return Value(value.data.reshape(out_shape), layout, chw)
    if value.layout == NHWC and out_shape == (n, value.shape[1], math.prod(value.shape[2:])):
        return Value(value.data.reshape(n, out_shape[2], out_shape[1]), NLC)
    if value.layout == NLC and len(out_shape) == 4 and out_shape[:2] == value.shape[:2]:
        return Value(value.data.reshape(n, *out_shape[2:], out_shape[1]), NHWC)
    if value.layout == FLAT and out_shape == value.shape:
        return value
    return Value(plain(value).reshape(out_shape))


def op_flatten(node: Node, inputs, weights: Weights):
    x = inputs[0]
    axis = node.attrs.get("axis", 1)
    axis = axis + len(x.shape) if axis < 0 else axis
    out_shape = (math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))
    return [_flattened(x, out_shape)]


def op_reshape(node: Node, inputs, weights: Weights):
    x = inputs[0]
    if node.opset < 5:
        target = np.asarray(node.attrs.get("shape", ()))
    else:
        target = static(inputs[1], "the target shape")
    return [_flattened(x, _reshaped(x.shape, target, bool(node.attrs.get("allowzero", 0))))]


_NHWC_AXIS = (0, 3, 1, 2)  # graph axis of an NHWC-stored value -> stored axis
_STORED_AXIS = {NHWC: _NHWC_AXIS, NLC: (0, 2, 1)}  # the same for each channels-last layout


def op_concat(node: Node, inputs, weights: Weights):
    axis = node.attrs["axis"]
    rank = len(inputs[0].shape)
    axis = axis + rank if axis < 0 else axis
    if all(v.static for v in inputs):
        return [Value(np.concatenate([v.data for v in inputs], axis=axis))]
    layout = inputs[0].layout
    if layout in _STORED_AXIS and all(v.layout == layout for v in inputs):
        stored = _STORED_AXIS[layout][axis]
        return [Value(jnp.concatenate([v.data for v in inputs], axis=stored), layout)]
    parts = [
        float_operand(weights, node, f"in{i}", v) if v.static else plain(v)
        for i, v in enumerate(inputs)
    ]
    return [Value(jnp.concatenate(parts, axis=axis))]


def op_pad(node: Node, inputs, weights: Weights):
    x = inputs[0]
    rank = len(x.shape)
    mode = node.attrs.get("mode", "constant")
    if node.opset < 11:
        pads, value = node.attrs.get("pads", ()), node.attrs.get("value", 0.0)
        axes = list(range(rank))
    else:
        pads = static(inputs[1], "pads")
        value = inputs[2] if len(inputs) > 2 and inputs[2] is not None else None
        value = float(static(value, "constant_value")) if value is not None else 0.0
        axes = inputs[3] if len(inputs) > 3 and inputs[3] is not None else None
        axes = [int(a) % rank for a in static(axes, "axes")] if axes is not None else range(rank)
        axes = list(axes)
    pads = [int(p) for p in pads]
    if len(pads) != 2 * len(axes):
        raise NodeError(f"pads={pads}; expected {2 * len(axes)} values")
    widths = [(0, 0)] * rank
    for i, axis in enumerate(axes):
        widths[axis] = (pads[i], pads[i + len(axes)])
    if x.layout == NHWC:
        widths = [widths[axis] for axis in (0, 2, 3, 1)]  # stored N, H, W, C
        data = x.data
    else:
        x, data = Value(plain(x)), plain(x)
    if mode == "constant":
        config = [(lo, hi, 0) for lo, hi in widths]
        return [
            dataclasses.replace(x, data=jax.lax.pad(data, jnp.asarray(value, data.dtype), config))
        ]
    if mode not in ("reflect", "edge", "wrap"):
        raise NodeError(f"mode={mode!r}; expected constant, reflect, edge or wrap")
    if min(min(w) for w in widths) < 0:
        raise NodeError(f"negative pads {pads} with mode={mode!r}; only constant mode crops")
    return [dataclasses.replace(x, data=jnp.pad(data, widths, mode=mode))]


def op_transpose(node: Node, inputs, weights: Weights):
    x = inputs[0]
    perm = tuple(node.attrs.get("perm", tuple(reversed(range(len(x.shape))))))
    if x.layout == NHWC and perm == (0, 2, 3, 1):  # to NHWC: the stored data already is
        return [Value(x.data)]
    if x.layout == NLC and perm == (0, 2, 1):  # [N, C, L] to tokens [N, L, C]: as stored
        return [Value(x.data)]
    if x.layout == PLAIN and not x.static and perm == (0, 3, 1, 2):  # to NCHW: keep it stored
        return [Value(x.data, NHWC)]
    if x.layout == PLAIN and not x.static and perm == (0, 2, 1):  # tokens to [N, C, L]
        return [Value(x.data, NLC)]
    if x.static:
        return [Value(np.transpose(x.data, perm))]
    return [Value(jnp.transpose(plain(x), perm))]


def op_softmax(node: Node, inputs, weights: Weights):
    x = plain(inputs[0])
    fn = jax.nn.softmax if node.op_type == "Softmax" else jax.nn.log_softmax
    axis = node.attrs.get("axis", -1 if node.opset >= 13 else 1)
    if node.opset >= 13:
        return [Value(fn(x, axis=axis))]
    axis = axis + x.ndim if axis < 0 else axis  # before opset 13: over all axes from `axis` on
    flat = x.reshape(math.prod(x.shape[:axis]), -1)
    return [Value(fn(flat, axis=-1).reshape(x.shape))]


def _reduce(numpy_fn, jax_fn):
    """ReduceMean, ReduceSum, ...: axes from the input (opset 13 for ReduceSum, 18 for the
    others) or the attribute; on static values in NumPy."""

    def handler(node: Node, inputs, weights: Weights):
        x = inputs[0]
        rank = len(x.shape)
        if len(inputs) > 1 and inputs[1] is not None:
            axes = static(inputs[1], "axes")
        else:
            axes = node.attrs.get("axes")
        if axes is None or len(np.atleast_1d(axes)) == 0:
            if node.attrs.get("noop_with_empty_axes", 0):
                return [x]
            axes = range(rank)
        axes = sorted(int(a) % rank for a in np.atleast_1d(axes))
        keepdims = bool(node.attrs.get("keepdims", 1))
        if x.static:
            return [Value(np.asarray(numpy_fn(x.data, axis=tuple(axes), keepdims=keepdims)))]
        if x.layout in _STORED_AXIS and keepdims:
            stored = tuple(_STORED_AXIS[x.layout][a] for a in axes)
            return [Value(jax_fn(x.data, axis=stored, keepdims=True), x.layout)]
        if x.layout in _STORED_AXIS and axes == list(range(2, rank)):  # pooling to [N, C]
            return [Value(jax_fn(x.data, axis=tuple(range(1, rank - 1))))]
        return [Value(jax_fn(plain(x), axis=tuple(axes), keepdims=keepdims))]

    return handler


# Shape arithmetic: on static values in NumPy; the few traced uses on plain values.


def op_shape(node: Node, inputs, weights: Weights):
    shape = np.asarray(inputs[0].shape, np.int64)
    return [Value(shape[node.attrs.get("start", 0) : node.attrs.get("end", len(shape))])]


def op_constant(node: Node, inputs, weights: Weights):
    return [Value(node.attrs["value"])]


def op_gather(node: Node, inputs, weights: Weights):
    x, indices = inputs[0], static(inputs[1], "indices")
    axis = node.attrs.get("axis", 0)
    if x.static:
        return [Value(np.take(x.data, indices, axis=axis))]
    return [Value(jnp.take(plain(x), indices, axis=axis))]


def _axes(node: Node, inputs, rank_for_negative: int) -> list[int] | None:
    if node.opset >= 13:
        if len(inputs) < 2 or inputs[1] is None:
            return None
        axes = static(inputs[1], "axes")
    else:
        axes = node.attrs.get("axes")
        if axes is None:
            return None
    return sorted(int(a) % rank_for_negative for a in np.atleast_1d(axes))


def op_unsqueeze(node: Node, inputs, weights: Weights):
    x = inputs[0]
    axes = static(inputs[1], "axes") if node.opset >= 13 else node.attrs.get("axes")
    if axes is None:
        raise NodeError("axes are missing")
    axes = np.atleast_1d(axes)
    rank = len(x.shape) + len(axes)
    data = x.data if x.static else plain(x)
    xp = np if x.static else jnp
    for axis in sorted(int(a) % rank for a in axes):
        data = xp.expand_dims(data, axis)
    return [Value(data)]


def op_squeeze(node: Node, inputs, weights: Weights):
    x = inputs[0]
    axes = _axes(node, inputs, len(x.shape))
    data = x.data if x.static else plain(x)
    xp = np if x.static else jnp
    if axes is None:
        axes = [i for i, d in enumerate(x.shape) if d == 1]
    return [Value(xp.squeeze(data, axis=tuple(axes)))]


def op_cast(node: Node, inputs, weights: Weights):
    import onnx

    dtype = onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"])
    x = inputs[0]
    if x.static:
        return [Value(x.data.astype(dtype))]
    if not np.issubdtype(dtype, np.floating):
        raise NodeError(f"casts the image's values to {dtype}; expected a float type")
    return [x]  # activations stay float32


def op_slice(node: Node, inputs, weights: Weights):
    x = inputs[0]
    rank = len(x.shape)
    if node.opset < 10:
        starts, ends = node.attrs["starts"], node.attrs["ends"]
        axes, steps = node.attrs.get("axes", range(len(starts))), [1] * len(starts)
    else:
        starts, ends = static(inputs[1], "starts"), static(inputs[2], "ends")
        axes = static(inputs[3], "axes") if len(inputs) > 3 and inputs[3] is not None else None
        steps = static(inputs[4], "steps") if len(inputs) > 4 and inputs[4] is not None else None
        axes = range(len(starts)) if axes is None else axes
        steps = [1] * len(starts) if steps is None else steps
    index = [slice(None)] * rank
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        size = x.shape[int(axis) % rank]  # ends may be int64 extremes: clamp them
        start, end = (int(max(-size - 1, min(size, v))) for v in (start, end))
        index[int(axis) % rank] = slice(start, end, int(step))
    data = x.data if x.static else plain(x)
    return [Value(data[tuple(index)])]


# Transformer and modern-CNN operators.


def op_layer_norm(node: Node, inputs, weights: Weights):
    """ONNX LayerNormalization: over the axes from `axis` on, then scale and bias."""
    if any(node.outputs[1:]):
        raise NodeError("its Mean or InvStdDev output is used; expected an inference graph")
    x = plain(inputs[0])
    axis = node.attrs.get("axis", -1) % x.ndim
    axes = tuple(range(axis, x.ndim))
    y = _normalized(x, axes, node.attrs.get("epsilon", 1e-5))
    y = y * (
        float_operand(weights, node, "scale", inputs[1]) if inputs[1].static else plain(inputs[1])
    )
    if len(inputs) > 2 and inputs[2] is not None:
        bias = inputs[2]
        y = y + (float_operand(weights, node, "bias", bias) if bias.static else plain(bias))
    return [Value(y)]


def _normalized(x, axes, epsilon: float):
    """(x - mean) / sqrt(var + epsilon) over `axes`."""
    centred = x - jnp.mean(x, axis=axes, keepdims=True)
    variance = jnp.mean(jnp.square(centred), axis=axes, keepdims=True)
    return centred * jax.lax.rsqrt(variance + epsilon)


def op_instance_norm(node: Node, inputs, weights: Weights):
    """InstanceNormalization: per image and channel over the spatial axes (also what
    PyTorch writes for GroupNorm before opset 21, between two Reshapes)."""
    x = inputs[0]
    scale, bias = static(inputs[1], "scale"), static(inputs[2], "B")
    epsilon = node.attrs.get("epsilon", 1e-5)
    rank = len(x.shape)
    per_channel = (-1,) + (1,) * (rank - 2)
    if x.layout in _STORED_AXIS:  # channels last: the spatial axes are 1 .. rank-2
        data, like = x.data, x
        axes = tuple(range(1, rank - 1))
    else:
        data, like = plain(x), Value(None)
        axes = tuple(range(2, rank))

    def param(key, array):
        return weights.get(node, key, lambda: to_layout(array.reshape(per_channel), like))

    y = _normalized(data, axes, epsilon) * param("scale", scale) + param("bias", bias)
    return [Value(y, like.layout)]


def op_group_norm(node: Node, inputs, weights: Weights):
    """GroupNormalization: over each group of channels and the spatial axes. Its scale
    and bias are per group before opset 21, per channel from 21."""
    x = plain(inputs[0])
    groups = node.attrs["num_groups"]
    n, channels = x.shape[:2]
    grouped = x.reshape(n, groups, channels // groups, *x.shape[2:])
    axes = tuple(range(2, grouped.ndim))
    y = _normalized(grouped, axes, node.attrs.get("epsilon", 1e-5)).reshape(x.shape)
    scale, bias = static(inputs[1], "scale"), static(inputs[2], "bias")
    per_channel = (-1,) + (1,) * (x.ndim - 2)

    def param(key, array):
        if array.shape[0] == groups and groups != channels:  # per group: repeated per channel
            array = np.repeat(array, channels // groups)
        return weights.get(node, key, lambda: array.reshape(per_channel))

    return [Value(y * param("scale", scale) + param("bias", bias))]


def _gelu(node: Node, x):
    approximate = node.attrs.get("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise NodeError(f"approximate={approximate!r}; expected 'none' or 'tanh'")
    return jax.nn.gelu(x, approximate=approximate == "tanh")


def _hard_sigmoid(node: Node, x):
    alpha, beta = node.attrs.get("alpha", 0.2), node.attrs.get("beta", 0.5)
    return jnp.clip(x * jnp.float32(alpha) + jnp.float32(beta), 0.0, 1.0)


def _math(numpy_fn, jax_fn):
    """An elementwise function: in NumPy on static values (shape arithmetic), else in JAX,
    in the value's own layout."""

    def handler(node: Node, inputs, weights: Weights):
        x = inputs[0]
        if x.static:
            return [Value(np.asarray(numpy_fn(x.data)))]
        return [dataclasses.replace(x, data=jax_fn(x.data))]

    return handler


def _variadic(numpy_fn, jax_fn, mean: bool = False):
    """Max, Min, Sum, Mean of any number of inputs, as a chain of broadcasting binaries."""
    pair = _binary(numpy_fn, jax_fn)

    def handler(node: Node, inputs, weights: Weights):
        total = inputs[0]
        for i, value in enumerate(inputs[1:]):
            (total,) = pair(
                dataclasses.replace(node, name=f"{node.name}/{i}"), [total, value], weights
            )
        if mean and len(inputs) > 1:
            divide = _binary(np.divide, jnp.divide)
            count = Value(np.asarray(len(inputs), np.float32))
            (total,) = divide(
                dataclasses.replace(node, name=f"{node.name}/mean"), [total, count], weights
            )
        return [total]

    return handler


def op_mod(node: Node, inputs, weights: Weights):
    if node.attrs.get("fmod", 0):
        return _binary(np.fmod, jnp.fmod)(node, inputs, weights)
    return _binary(np.mod, jnp.mod)(node, inputs, weights)


def op_where(node: Node, inputs, weights: Weights):
    condition, a, b = inputs
    if condition.static and a.static and b.static:
        return [Value(np.where(condition.data, a.data, b.data))]
    lhs = float_operand(weights, node, "a", a) if a.static else plain(a)
    rhs = float_operand(weights, node, "b", b) if b.static else plain(b)
    choose = condition.data if condition.static else plain(condition)
    return [Value(jnp.where(choose, lhs, rhs))]


def _is_weight(value: Value) -> bool:
    """A float constant with more than one value: a weight, not a fill."""
    if not value.static or not np.issubdtype(value.data.dtype, np.floating):
        return False
    return value.data.size > 1 and not np.all(value.data == value.data.flat[0])


def op_expand(node: Node, inputs, weights: Weights):
    """Broadcasts to a shape (both ways, as ONNX's Expand). A weight stays a parameter of
    its own shape, expanded inside the graph: the target shape usually holds the batch
    size (a ViT's class token). Fill values (masks built by slice assignment) fold."""
    x = inputs[0]
    target = tuple(int(d) for d in static(inputs[1], "the shape"))
    out_shape = np.broadcast_shapes(x.shape, target)
    if x.static and not _is_weight(x):
        return [Value(np.broadcast_to(x.data, out_shape).copy())]
    data = weights.get(node, "input", x.data) if x.static else plain(x)
    return [Value(jnp.broadcast_to(data, out_shape))]


def op_tile(node: Node, inputs, weights: Weights):
    x, repeats = inputs[0], [int(r) for r in static(inputs[1], "repeats")]
    if x.static and not _is_weight(x):
        return [Value(np.tile(x.data, repeats))]
    data = weights.get(node, "input", x.data) if x.static else plain(x)
    return [Value(jnp.tile(data, repeats))]


def op_constant_of_shape(node: Node, inputs, weights: Weights):
    shape = tuple(int(d) for d in static(inputs[0], "the shape"))
    fill = np.asarray(node.attrs.get("value", np.zeros(1, np.float32))).reshape(-1)
    return [Value(np.full(shape, fill[0], fill.dtype))]


def op_range(node: Node, inputs, weights: Weights):
    start, limit, delta = (
        static(v, what) for v, what in zip(inputs, ("start", "limit", "delta"), strict=True)
    )
    return [Value(np.arange(start, limit, delta, dtype=np.asarray(start).dtype))]


def op_split(node: Node, inputs, weights: Weights):
    """Split: sizes from the input (opset 13), the attribute (before 13), or equal parts
    (`num_outputs` from opset 18, else one per output; the last part may be smaller)."""
    x = inputs[0]
    rank = len(x.shape)
    axis = node.attrs.get("axis", 0) % rank
    size = x.shape[axis]
    if len(inputs) > 1 and inputs[1] is not None:
        sizes = [int(v) for v in static(inputs[1], "split")]
    elif "split" in node.attrs:
        sizes = [int(v) for v in node.attrs["split"]]
    else:
        parts = node.attrs.get("num_outputs", len(node.outputs))
        chunk = math.ceil(size / parts)
        sizes = [chunk] * (parts - 1) + [size - chunk * (parts - 1)]
    if sum(sizes) != size or len(sizes) != len(node.outputs) or min(sizes) < 0:
        raise NodeError(f"cannot split {size} into {sizes} for {len(node.outputs)} outputs")
    bounds = np.cumsum(sizes)[:-1].tolist()
    if x.static:
        return [Value(part) for part in np.split(x.data, bounds, axis=axis)]
    if x.layout in _STORED_AXIS:
        parts = jnp.split(x.data, bounds, axis=_STORED_AXIS[x.layout][axis])
        return [Value(part, x.layout) for part in parts]
    return [Value(part) for part in jnp.split(plain(x), bounds, axis=axis)]


def op_einsum(node: Node, inputs, weights: Weights):
    equation = node.attrs["equation"]
    if all(v.static for v in inputs):
        return [Value(np.einsum(equation, *(v.data for v in inputs)))]
    operands = [
        float_operand(weights, node, f"in{i}", v) if v.static else plain(v)
        for i, v in enumerate(inputs)
    ]
    return [Value(jnp.einsum(equation, *operands, precision=HIGHEST))]


def op_gather_nd(node: Node, inputs, weights: Weights):
    """GatherND with constant indices, `batch_dims` leading axes shared by data and indices."""
    x, indices = inputs[0], static(inputs[1], "indices")
    batch_dims = node.attrs.get("batch_dims", 0)
    data = x.data if x.static else plain(x)
    batch_shape = data.shape[:batch_dims]
    data = data.reshape(-1, *data.shape[batch_dims:])
    indices = indices.reshape(-1, *indices.shape[batch_dims:])

    def gather(block, at):  # one batch entry: at [..., k] indexes block's first k axes
        return block[tuple(at[..., i] for i in range(at.shape[-1]))]

    if x.static:
        out = np.stack([gather(block, at) for block, at in zip(data, indices, strict=True)])
    else:
        out = jax.vmap(gather)(data, jnp.asarray(indices))
    return [Value(out.reshape(*batch_shape, *out.shape[1:]))]


def op_scatter_nd(node: Node, inputs, weights: Weights):
    """ScatterND with constant indices (Swin's masks and relative position indices are
    built by slice assignment): in NumPy when all is static, else `.at[...]`."""
    data, updates = inputs[0], inputs[2]
    indices = static(inputs[1], "indices")
    where = tuple(np.moveaxis(indices, -1, 0))
    reduction = node.attrs.get("reduction", "none")
    if reduction not in ("none", "add", "mul", "max", "min"):
        raise NodeError(f"reduction={reduction!r}; expected none, add, mul, max or min")
    if data.static and updates.static:
        out = data.data.copy()
        if reduction == "none":
            out[where] = updates.data
        else:
            ufunc = {"add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}
            ufunc[reduction].at(out, where, updates.data)
        return [Value(out)]
    base = float_operand(weights, node, "data", data) if data.static else plain(data)
    new = float_operand(weights, node, "updates", updates) if updates.static else plain(updates)
    at = jnp.asarray(base).at[where]
    method = {"none": at.set, "add": at.add, "mul": at.multiply, "max": at.max, "min": at.min}
    return [Value(method[reduction](new))]


def _erf_numpy(x):
    return np.vectorize(math.erf, otypes=[np.asarray(x).dtype])(x)


OPERATORS: dict[str, Callable] = {
    "Conv": op_conv,
    "Gemm": op_gemm,
    "MatMul": op_matmul,
    "Add": _binary(np.add, jnp.add),
    "Sub": _binary(np.subtract, jnp.subtract),
    "Mul": _binary(np.multiply, jnp.multiply),
    "Div": _binary(_integer_safe_divide, jnp.divide),
    "Relu": _unary(lambda node, x: jax.nn.relu(x)),
    "LeakyRelu": _unary(lambda node, x: jax.nn.leaky_relu(x, node.attrs.get("alpha", 0.01))),
    "Sigmoid": _unary(lambda node, x: jax.nn.sigmoid(x)),
    "Tanh": _unary(lambda node, x: jnp.tanh(x)),
    "Clip": op_clip,
    "MaxPool": op_max_pool,
    "AveragePool": op_average_pool,
    "GlobalAveragePool": op_global_average_pool,
    "GlobalMaxPool": op_global_max_pool,
    "BatchNormalization": op_batch_norm,
    "Flatten": op_flatten,
    "Reshape": op_reshape,
    "Concat": op_concat,
    "Pad": op_pad,
    "Dropout": op_identity,
    "Identity": op_identity,
    "Softmax": op_softmax,
    "LogSoftmax": op_softmax,
    "Transpose": op_transpose,
    "ReduceMean": _reduce(np.mean, jnp.mean),
    "ReduceSum": _reduce(np.sum, jnp.sum),
    "ReduceMax": _reduce(np.max, jnp.max),
    "ReduceMin": _reduce(np.min, jnp.min),
    "ReduceProd": _reduce(np.prod, jnp.prod),
    "ReduceL1": _reduce(
        lambda x, **kw: np.sum(np.abs(x), **kw), lambda x, **kw: jnp.sum(jnp.abs(x), **kw)
    ),
    "ReduceL2": _reduce(
        lambda x, **kw: np.sqrt(np.sum(np.square(x), **kw)),
        lambda x, **kw: jnp.sqrt(jnp.sum(jnp.square(x), **kw)),
    ),
    "ReduceSumSquare": _reduce(
        lambda x, **kw: np.sum(np.square(x), **kw), lambda x, **kw: jnp.sum(jnp.square(x), **kw)
    ),
    "Constant": op_constant,
    "Shape": op_shape,
    "Gather": op_gather,
    "Unsqueeze": op_unsqueeze,
    "Squeeze": op_squeeze,
    "Cast": op_cast,
    "Slice": op_slice,
    "LayerNormalization": op_layer_norm,
    "InstanceNormalization": op_instance_norm,
    "GroupNormalization": op_group_norm,
    "Gelu": _unary(_gelu),
    "Erf": _math(_erf_numpy, jax.lax.erf),
    "HardSigmoid": _unary(_hard_sigmoid),
    "HardSwish": _unary(lambda node, x: x * jnp.clip(x / 6 + 0.5, 0.0, 1.0)),
    "Softplus": _unary(lambda node, x: jax.nn.softplus(x)),
    "Mish": _unary(lambda node, x: x * jnp.tanh(jax.nn.softplus(x))),
    "Selu": _unary(
        lambda node, x: (
            node.attrs.get("gamma", 1.05070102214813232421875)
            * jnp.where(x > 0, x, node.attrs.get("alpha", 1.67326319217681884765625) * jnp.expm1(x))
        )
    ),
    "PRelu": _binary(
        lambda x, slope: np.where(x < 0, x * slope, x),
        lambda x, slope: jnp.where(x < 0, x * slope, x),
    ),
    "Elu": _unary(lambda node, x: jax.nn.elu(x, node.attrs.get("alpha", 1.0))),
    "Sqrt": _math(np.sqrt, jnp.sqrt),
    "Exp": _math(np.exp, jnp.exp),
    "Log": _math(np.log, jnp.log),
    "Neg": _math(np.negative, jnp.negative),
    "Abs": _math(np.abs, jnp.abs),
    "Reciprocal": _math(np.reciprocal, jnp.reciprocal),
    "Floor": _math(np.floor, jnp.floor),
    "Ceil": _math(np.ceil, jnp.ceil),
    "Not": _math(np.logical_not, jnp.logical_not),
    "Pow": _binary(np.power, jnp.power),
    "Mod": op_mod,
    "Equal": _binary(np.equal, jnp.equal),
    "Less": _binary(np.less, jnp.less),
    "LessOrEqual": _binary(np.less_equal, jnp.less_equal),
    "Greater": _binary(np.greater, jnp.greater),
    "GreaterOrEqual": _binary(np.greater_equal, jnp.greater_equal),
    "And": _binary(np.logical_and, jnp.logical_and),
    "Or": _binary(np.logical_or, jnp.logical_or),
    "Max": _variadic(np.maximum, jnp.maximum),
    "Min": _variadic(np.minimum, jnp.minimum),
    "Sum": _variadic(np.add, jnp.add),
    "Mean": _variadic(np.add, jnp.add, mean=True),
    "Where": op_where,
    "Expand": op_expand,
    "Tile": op_tile,
    "ConstantOfShape": op_constant_of_shape,
    "Range": op_range,
    "Split": op_split,
    "Einsum": op_einsum,
    "ScatterND": op_scatter_nd,
    "GatherND": op_gather_nd,
}


# ---------------------------------------------------------------------------------------------
# The interpreter


def forward(graph: Graph, weights: Weights, images) -> jax.Array:
    """Runs the graph on model inputs [N, H, W, C] (after the input convention) -> logits."""
    env: dict[str, Value] = {name: Value(array) for name, array in graph.constants.items()}
    env[graph.input_name] = Value(images, NHWC) if graph.nchw else Value(images)
    for node in graph.nodes:
        inputs = [env[name] if name else None for name in node.inputs]
        try:
            outputs = OPERATORS[node.op_type](node, inputs, weights)
        except (NodeError, ValueError, TypeError, IndexError, KeyError, ZeroDivisionError) as err:
            raise _error(graph.path, f"node {node.name!r} ({node.op_type}): {err}") from err
        for name, value in zip(node.outputs, outputs, strict=False):
            if name:
                env[name] = value
    return _logits(env[graph.output_name], graph)


def _logits(value: Value, graph: Graph) -> jax.Array:
    shape = value.shape
    if len(shape) == 4 and shape[2:] == (1, 1):  # a fully convolutional head: [N, C, 1, 1]
        return jnp.asarray(value.data).reshape(shape[0], shape[1]).astype(jnp.float32)
    if len(shape) != 2:
        raise _error(
            graph.path,
            f"output {graph.output_name!r} has shape {list(shape)}; expected [batch, classes]",
        )
    return jnp.asarray(plain(value)).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Reading the file


def load_onnx_model(
    path: str | bytes | Any,
    input_convention: InputConvention | None = None,
    image_size: tuple[int, int] | None = None,
) -> LoadedModel:
    """Loads an ONNX image classifier as a `LoadedModel` (see the module docstring).

    `path` is an .onnx file, or the model itself: its serialized bytes (e.g. what
    `torch.onnx.export` wrote into an `io.BytesIO`) or an `onnx.ModelProto`, named
    `<memory>` in errors. `image_size` (H, W) fixes a graph input whose height and
    width are dynamic.
    """
    convention = input_convention or InputConvention()
    model = _read(path)
    path = path if isinstance(path, str) else IN_MEMORY
    graph, shape, batch_one, info = _parse(model, path, image_size)
    prepare = _prepare(convention, shape[-1], path)

    def run(weights: Weights, images):
        x = prepare(images)
        if batch_one:  # the graph takes one image: map it over the batch
            return jax.vmap(lambda image: forward(graph, weights, image[None])[0])(x)
        return forward(graph, weights, x)

    # The first pass collects the weights, the second finds those that depend on the
    # batch size; both check the batch axis.
    collected = None
    for batch in (2, 3):
        weights = Weights(against=collected)
        try:
            out = jax.eval_shape(
                lambda images: run(weights, images),  # noqa: B023 - called at once
                jax.ShapeDtypeStruct((batch, *shape), jnp.float32),
            )
        except InputError:
            raise
        except (TypeError, ValueError) as err:
            raise _error(path, f"the graph does not run on {list(shape)} images: {err}") from err
        if out.shape[0] != batch:
            raise _error(
                path,
                f"on a batch of {batch} images the output has shape "
                f"{list(out.shape)}; the graph fixes its batch size (e.g. a Reshape to "
                "[1, -1]). Re-export it with a dynamic batch axis, or with batch size 1",
            )
        collected = weights.collected if collected is None else collected
    inline = weights.inline  # depend on the batch size: computed in the graph, not parameters
    params = {}
    for name, arrays in collected.items():
        for key, array in arrays.items():
            if (name, key) not in inline:
                params.setdefault(name, {})[key] = jnp.asarray(array)
    num_classes = int(out.shape[1])

    def apply_fn(params, images):
        """[N, H, W, C] float pixels 0-255 -> logits [N, num_classes]."""
        return run(Weights(params, inline), images)

    return importing.loaded_model(
        "onnx",
        path,
        apply_fn=apply_fn,
        params=params,
        image_shape=shape,
        num_classes=num_classes,
        input_meta={"input_convention": convention.as_dict()},
        meta=info,
    )


def load_options(section) -> dict:
    """`load_onnx_model` keywords from a run config's `onnx` section (configs/default.py):
    `input_convention` and `image_size`; InputError when `image_size` is not 'H,W'."""
    image_size = None
    if section.get("image_size"):
        try:
            image_size = tuple(int(v) for v in str(section.image_size).split(","))
        except ValueError:
            image_size = ()
        if len(image_size) != 2 or min(image_size) < 1:
            raise InputError(
                f"onnx.image_size={section.image_size!r}: expected 'H,W', e.g. '224,224'"
            )
    return {"input_convention": convention_lib.from_config(section), "image_size": image_size}


def _read(source):
    """The ModelProto of a file, of serialized bytes, or the ModelProto itself, checked."""
    import onnx
    from google.protobuf.message import DecodeError

    path = source if isinstance(source, str) else IN_MEMORY
    if isinstance(source, str):
        importing.check_file("onnx", path, "an .onnx file")
    elif not isinstance(source, bytes | bytearray | memoryview | onnx.ModelProto):
        raise _error(
            path,
            f"got a {type(source).__name__}; expected a path, serialized bytes or an "
            "onnx.ModelProto",
        )
    try:
        if isinstance(source, onnx.ModelProto):
            model = source
        elif isinstance(source, str):
            model = onnx.load(path)
        else:
            model = onnx.load_model_from_string(bytes(source))
    except onnx.checker.ValidationError as err:  # e.g. its external weights file is missing
        raise _error(
            path,
            f"{str(err).strip()}; keep the weights file torch.onnx.export "
            "wrote beside the .onnx file (or export with external_data=False)",
        ) from err
    except (DecodeError, ValueError, OSError, RuntimeError, UnicodeDecodeError) as err:
        raise _error(
            path,
            f"cannot be read as an ONNX model ({type(err).__name__}: "
            f"{err}); expected a file written by onnx.save or torch.onnx.export",
        ) from err
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _error(path, f"not a valid ONNX model ({message})") from err
    return model


def _attributes(proto, path: str, node_name: str) -> dict:
    import onnx
    from onnx import numpy_helper

    attrs = {}
    for attribute in proto.attribute:
        value = onnx.helper.get_attribute_value(attribute)
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        elif isinstance(value, onnx.TensorProto):
            value = numpy_helper.to_array(value)
        elif isinstance(value, list):
            value = tuple(v.decode("utf-8") if isinstance(v, bytes) else v for v in value)
        elif isinstance(value, onnx.GraphProto | onnx.SparseTensorProto):
            raise _error(
                path,
                f"node {node_name!r} ({proto.op_type}): attribute "
                f"{attribute.name!r} holds a subgraph or sparse tensor; not supported",
            )
        attrs[attribute.name] = value
    if proto.op_type == "Constant":  # value_float, value_ints, ... -> value
        (key, value), *rest = attrs.items() if attrs else ((None, None),)
        if rest or key not in ("value", "value_float", "value_floats", "value_int", "value_ints"):
            raise _error(
                path,
                f"node {node_name!r} (Constant): attributes "
                f"{sorted(attrs)}; expected one of value, value_float(s), value_int(s)",
            )
        dtype = np.float32 if key.startswith("value_float") else np.int64
        attrs = {"value": np.asarray(value, dtype=None if key == "value" else dtype)}
    return attrs


def _parse(model, path: str, image_size):
    """(Graph, image shape (H, W, C), whether the graph's batch is fixed to 1, meta)."""
    from onnx import numpy_helper

    opsets = {entry.domain or "ai.onnx": entry.version for entry in model.opset_import}
    opset = opsets.get("ai.onnx", opsets.get("", 1))
    graph = model.graph
    if len(graph.sparse_initializer):
        raise _error(path, "sparse initializers are not supported")
    constants = {}
    for initializer in graph.initializer:
        constants[initializer.name] = numpy_helper.to_array(initializer)
    inputs = [value for value in graph.input if value.name not in constants]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise _error(
            path,
            f"{len(inputs)} inputs {[v.name for v in inputs]} and "
            f"{len(graph.output)} outputs {[v.name for v in graph.output]}; expected one image "
            "input and one output (the logits or probabilities)",
        )
    image_input, output_name = inputs[0], graph.output[0].name
    nchw, image_shape, batch_one = _input_layout(image_input, path, image_size)

    # Nodes, named uniquely, and kept only when the output depends on them.
    nodes, names = [], set()
    for index, proto in enumerate(graph.node):
        name = proto.name or f"{proto.op_type}_{index}"
        while name in names:
            name = f"{name}_{index}"
        names.add(name)
        nodes.append((name, proto))
    producer = {out: i for i, (_, proto) in enumerate(nodes) for out in proto.output if out}
    needed, stack = set(), [output_name]
    while stack:
        value = stack.pop()
        if value in producer and producer[value] not in needed:
            needed.add(producer[value])
            stack.extend(v for v in nodes[producer[value]][1].input if v)
    unsupported = [
        f"{name!r} ({proto.domain + '.' if proto.domain not in ('', 'ai.onnx') else ''}"
        f"{proto.op_type})"
        for i, (name, proto) in enumerate(nodes)
        if i in needed and (proto.domain not in ("", "ai.onnx") or proto.op_type not in OPERATORS)
    ]
    if unsupported:
        raise _error(
            path,
            f"unsupported operator(s) at node(s) {', '.join(unsupported)}; "
            f"supported: {', '.join(sorted(OPERATORS))}",
        )
    known = set(constants) | {image_input.name} | set(producer)
    read = {output_name} | {v for i in needed for v in nodes[i][1].input}
    parsed = []
    for i, (name, proto) in enumerate(nodes):
        if i not in needed:
            continue
        missing = [v for v in proto.input if v and v not in known]
        if missing:
            raise _error(
                path, f"node {name!r} ({proto.op_type}) reads undefined value(s) {missing}"
            )
        node = Node(
            name=name,
            op_type=proto.op_type,
            inputs=tuple(proto.input),
            outputs=tuple(v if v in read else "" for v in proto.output),  # '' = unused
            attrs=_attributes(proto, path, name),
            opset=opset,
        )
        parsed.append(node)
    parsed, dropped = _drop_final_softmax(parsed, output_name)
    info = {
        "input": {
            "name": image_input.name,
            "layout": "NCHW" if nchw else "NHWC",
            "batch": "1 (mapped over the batch)" if batch_one else "dynamic",
        },
        "output": output_name,
        "opset": opset,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "operators": sorted({node.op_type for node in parsed}),
        "dropped_final": dropped,
    }
    return (
        Graph(path, tuple(parsed), constants, image_input.name, nchw, output_name),
        image_shape,
        batch_one,
        info,
    )


def _input_layout(value, path: str, image_size):
    """(NCHW?, (H, W, C), batch fixed to 1?) of the graph's image input."""
    import onnx

    tensor = value.type.tensor_type
    if tensor.elem_type != onnx.TensorProto.FLOAT:
        raise _error(
            path,
            f"input {value.name!r} has element type "
            f"{onnx.TensorProto.DataType.Name(tensor.elem_type)}; expected FLOAT (float32)",
        )
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    described = [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim
    ]
    nchw = _channels_first(dims)
    if nchw is None:
        raise _error(
            path,
            f"input {value.name!r} has shape {described}; expected images "
            "[N, C, H, W] or [N, H, W, C] with a fixed channel count (3 RGB, 1 grayscale)",
        )
    channels = dims[1] if nchw else dims[3]
    height, width = dims[2:4] if nchw else dims[1:3]
    if image_size:
        if (height or image_size[0], width or image_size[1]) != tuple(image_size):
            raise _error(
                path,
                f"input {value.name!r} has shape {described}; "
                f"image_size={list(image_size)} does not fit it",
            )
        height, width = image_size
    if not height or not width:
        raise _error(
            path,
            f"input {value.name!r} has shape {described} with a dynamic "
            "height or width; set the image size (--config.onnx.image_size=H,W)",
        )
    if dims[0] not in (None, 0, 1):
        raise _error(
            path,
            f"input {value.name!r} has a fixed batch of {dims[0]}; "
            "re-export with a dynamic batch axis (torch.onnx.export(..., dynamic_axes="
            "{'input': {0: 'batch'}})) or with batch size 1",
        )
    return nchw, (int(height), int(width), int(channels)), dims[0] == 1


def _channels_first(dims) -> bool | None:
    """Whether a 4-D image input [N, ?, ?, ?] is NCHW; None when it is not 4-D or its
    channels cannot be told. The channel axis is the fixed one of axes 1 and 3; with both
    fixed, the one beside a square (H, W), else the smaller (NCHW on a tie)."""
    if len(dims) != 4 or (not dims[1] and not dims[3]):
        return None
    if not dims[1] or not dims[3]:
        return bool(dims[1])
    if dims[2] == dims[3] != dims[1]:
        return True
    if dims[1] == dims[2] != dims[3]:
        return False
    return dims[1] <= dims[3]


def _prepare(convention: InputConvention, channels: int, path: str) -> Callable:
    """The input convention's `apply` for the graph's channel count (`for_channels`: one
    mean and std per channel, or one for all)."""
    try:
        return convention.for_channels(channels).apply
    except InputError as err:
        raise _error(path, f"the graph takes {channels}-channel images: {err}") from err


def _drop_final_softmax(nodes: list[Node], output_name: str) -> tuple[list[Node], str | None]:
    """Makes a Softmax/LogSoftmax over the classes that produces the output an Identity."""
    by_output = {out: i for i, node in enumerate(nodes) for out in node.outputs}
    readers = {}
    for node in nodes:
        for name in node.inputs:
            readers[name] = readers.get(name, 0) + 1
    name = output_name
    while name in by_output:
        node = nodes[by_output[name]]
        if node.op_type in ("Identity", "Dropout"):
            name = node.inputs[0]
            if readers.get(name, 0) > 1:
                break
            continue
        if node.op_type in ("Softmax", "LogSoftmax") and node.attrs.get("axis", -1) in (-1, 1):
            nodes[by_output[name]] = dataclasses.replace(node, op_type="Identity", attrs={})
            return nodes, node.op_type
        break
    return nodes, None
