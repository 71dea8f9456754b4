"""The rule table: how each primitive computes on windows.

`RULES` maps a primitive's name to its rule, as jax's interpreters keep one
rule per primitive (`jax.experimental.jet.jet_rules`, batching's
`primitive_batchers`). A rule is

    rule(ctx: Context, eqn: Equation, values: list) -> Computed | None

called when at least one operand is a `Window` and none is `Full` (other
operands are arrays: parameters, constants, values that do not depend on the
image). It returns the outputs and the `Form` it computed them in, or None
when it has no windowed form for this equation; the interpreter then computes
the equation in full (`full`). Families of rules:

- elementwise (`ELEMENTWISE`): operands cut to the union of their windows;
- layouts that keep a window (`keeps_window`: rev, transpose, squeeze,
  broadcast_in_dim), that move it (`pad`, `slice`), and `dot_general` and
  `reduce_sum` over other axes;
- sliding windows (`sliding_window`: `conv_general_dilated` and the
  `reduce_window` family), which grow the window by their kernel;
- delta forms (`Context.change`): the clean output plus the effect of the
  windows' change, for stride-1 convolutions and global sums.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from opa_jax.incremental import thresholds
from opa_jax.incremental.geometry import Context, Full, Window, slices
from opa_jax.incremental.program import CacheKey, Equation, Form, bind
from opa_jax.models import layers


class Computed(NamedTuple):
    """A rule's outputs (`Window`s or `Full`s, one per equation output) and its form."""

    outputs: list
    form: Form


Rule = Callable[[Context, Equation, list], Computed | None]

RULES: dict[str, Rule] = {}


def register(*names: str):
    """Decorator: the rule of the primitives `names`."""

    def decorate(rule: Rule) -> Rule:
        for name in names:
            if name in RULES:
                raise ValueError(f"two incremental rules for the primitive {name!r}")
            RULES[name] = rule
        return rule

    return decorate


def full(ctx: Context, eqn: Equation, values) -> Computed:
    """The equation computed in full, on its operands' full maps for this candidate."""
    args = [
        ctx.materialize(ref, value) if isinstance(value, Window | Full) else value
        for ref, value in zip(eqn.inputs, values, strict=True)
    ]
    return Computed([Full(out) for out in bind(eqn, *args)], Form.FULL)


def per_window(eqn: Equation, args, mapped, **params):
    """Binds the primitive once per window; `mapped` marks args with a window axis."""
    fn = functools.partial(eqn.primitive.bind, **{**eqn.params, **params})
    in_axes = [0 if m else None for m in mapped]
    return jax.vmap(fn, in_axes=in_axes)(*args)


def _window(data, axes, spans) -> Computed:
    return Computed([Window(data, tuple(axes), tuple(spans))], Form.WINDOW)


# ---------------------------------------------------------------------------
# Elementwise.

# Primitives that act on each position on their own (all operands of one shape, or
# broadcast from size 1).
ELEMENTWISE = frozenset(
    """abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp convert_element_type
    copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt imag
    integer_pow is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not or
    pow real reduce_precision rem round rsqrt select_n sign sin sinh sqrt square sub tan tanh
    xor""".split()
)


def _union(windows) -> list | None:
    """The spans covering every window's, axis by axis; None if the windows do not
    share their axes, strides and coordinates."""
    axes = windows[0].axes
    if any(v.axes != axes for v in windows):
        return None
    spans = []
    for i in range(len(axes)):
        group = {v.spans[i] for v in windows}
        first = next(iter(group))
        shape = (first.size, first.stride, first.coordinate)
        if any((s.size, s.stride, s.coordinate) != shape for s in group):
            return None
        low, high = min(s.low for s in group), max(s.high for s in group)
        spans.append(dataclasses.replace(first, low=low, high=high))
    return spans


@register(*ELEMENTWISE)
def elementwise(ctx: Context, eqn: Equation, values) -> Computed | None:
    """Every windowed operand on the union of the windows; the other operands sliced
    there (or broadcast, where they have size 1 along the windowed axes)."""
    windows = [v for v in values if isinstance(v, Window)]
    spans = _union(windows)
    if spans is None or not ctx.fits(spans):
        return None
    axes = windows[0].axes
    starts = [span.start(ctx.pixels) for span in spans]
    counts = [span.count for span in spans]
    args, mapped = [], []
    for ref, value in zip(eqn.inputs, values, strict=True):
        if isinstance(value, Window):
            args.append(ctx.rewindow(ref, value, spans))
            mapped.append(True)
            continue
        value = jnp.asarray(value)
        if value.ndim and any(value.shape[a] != 1 for a in axes):  # a static map: slice it
            args.append(slices(value, axes, starts, counts))
            mapped.append(True)
        else:
            args.append(value)
            mapped.append(False)
    return _window(per_window(eqn, args, mapped), axes, spans)


@register("concatenate")
def concatenate(ctx: Context, eqn: Equation, values) -> Computed | None:
    """Along an axis the windows do not cover: as elementwise."""
    windows = [v for v in values if isinstance(v, Window)]
    if eqn.params["dimension"] in windows[0].axes:
        return None
    return elementwise(ctx, eqn, values)


# ---------------------------------------------------------------------------
# Layouts: operations that keep or move the window.


def keeps_window(*names: str, params: Callable | None = None):
    """Family: operations acting along axes other than the window's, once per window.

    Decorates `out_axes(ctx, eqn, window)`: the windowed axes' positions in the
    output, or None when the operation reaches a windowed axis. `params(eqn,
    window, out_axes)` overrides the primitive's parameters for one window.
    """

    def decorate(out_axes_of: Callable) -> Callable:
        @register(*names)
        def rule(ctx: Context, eqn: Equation, values) -> Computed | None:
            (window,) = values
            out_axes = out_axes_of(ctx, eqn, window)
            if out_axes is None:
                return None
            overrides = params(eqn, window, out_axes) if params else {}
            data = per_window(eqn, [window.data], [True], **overrides)
            return _window(data, out_axes, window.spans)

        return out_axes_of

    return decorate


@keeps_window("rev")
def _rev(ctx, eqn, window):
    return None if set(eqn.params["dimensions"]) & set(window.axes) else window.axes


@keeps_window("transpose")
def _transpose(ctx, eqn, window):
    permutation = list(eqn.params["permutation"])
    return tuple(permutation.index(a) for a in window.axes)


@keeps_window("squeeze")
def _squeeze(ctx, eqn, window):
    dims = set(eqn.params["dimensions"])
    if dims & set(window.axes):
        return None
    return tuple(a - sum(d < a for d in dims) for a in window.axes)


def _broadcast_shape(eqn, window, out_axes) -> dict:
    """One window's output shape: the windowed axes cut to their counts."""
    shape = list(eqn.params["shape"])
    for o, span in zip(out_axes, window.spans, strict=True):
        shape[o] = span.count
    return {"shape": tuple(shape)}


@keeps_window("broadcast_in_dim", params=_broadcast_shape)
def _broadcast_in_dim(ctx, eqn, window):
    in_shape = ctx.program.avals[eqn.inputs[0]].shape
    p = eqn.params
    out_axes = tuple(p["broadcast_dimensions"][a] for a in window.axes)
    if any(p["shape"][o] != in_shape[a] for a, o in zip(window.axes, out_axes, strict=True)):
        return None
    return out_axes


@register("dot_general")
def dot_general(ctx: Context, eqn: Equation, values) -> Computed | None:
    """One windowed operand whose windowed axes are free (neither contracted nor
    batched): they keep the window (1x1 convolutions, dense layers over channels)."""
    (contract_l, contract_r), (batch_l, batch_r) = eqn.params["dimension_numbers"]
    lhs, rhs = values
    if isinstance(lhs, Window) == isinstance(rhs, Window):
        return None
    window, contract, batch, side = (
        (lhs, contract_l, batch_l, 0) if isinstance(lhs, Window) else (rhs, contract_r, batch_r, 1)
    )
    if set(window.axes) & (set(contract) | set(batch)):
        return None
    lhs_rank = len(ctx.program.avals[eqn.inputs[0]].shape)
    rhs_rank = len(ctx.program.avals[eqn.inputs[1]].shape)
    free_l = [a for a in range(lhs_rank) if a not in contract_l and a not in batch_l]
    free_r = [a for a in range(rhs_rank) if a not in contract_r and a not in batch_r]
    base = len(batch_l) + (0 if side == 0 else len(free_l))
    free = free_l if side == 0 else free_r
    out_axes = tuple(base + free.index(a) for a in window.axes)
    args = [lhs.data, rhs] if side == 0 else [lhs, rhs.data]
    data = per_window(eqn, args, [side == 0, side == 1])
    return _window(data, out_axes, window.spans)


@register("reduce_sum")
def reduce_sum(ctx: Context, eqn: Equation, values) -> Computed | None:
    """A sum over other axes keeps the window; a sum over every windowed axis (global
    average pooling) is the clean sum plus the windows' change (each position once)."""
    (window,) = values
    reduced = set(eqn.params["axes"])
    if not reduced & set(window.axes):
        out_axes = tuple(a - sum(r < a for r in reduced) for a in window.axes)
        axes = tuple(a + 1 for a in sorted(reduced))
        data = jnp.sum(window.data, axis=axes).astype(window.data.dtype)
        return _window(data, out_axes, window.spans)
    if not set(window.axes) <= reduced:
        return None
    change = ctx.change(eqn.inputs[0], window, ctx.starts(window))  # [k, ...]
    total = jnp.sum(change, axis=0)
    delta = jnp.sum(total, axis=tuple(sorted(reduced))).astype(window.data.dtype)
    return Computed([Full(ctx.lookup(CacheKey(eqn.outputs[0])) + delta)], Form.FULL_DELTA)


def _shift(ctx: Context, eqn: Equation, window: Window, offsets, prepare) -> Computed | None:
    """Padding or cropping along the windowed axes: the window moves by `offsets`.

    The output window is the clean output around it with the operand's
    window (first passed through `prepare`, which acts on the other axes)
    written in.
    """
    out_shape = ctx.program.avals[eqn.outputs[0]].shape
    spans = tuple(
        span.shifted(offsets[a], out_shape[a])
        for a, span in zip(window.axes, window.spans, strict=True)
    )
    if not ctx.fits(spans):
        return None
    moved = Window(prepare(window.data), window.axes, window.spans)
    clean = ctx.lookup(CacheKey(eqn.outputs[0]))
    starts = [span.start(ctx.pixels) for span in spans]
    regions = slices(clean, window.axes, starts, [span.count for span in spans])
    data = ctx.paste(regions, starts, window.axes, moved, [offsets[a] for a in window.axes])
    return _window(data, window.axes, spans)


@register("pad")
def pad(ctx: Context, eqn: Equation, values) -> Computed | None:
    window, pad_value = values
    if isinstance(pad_value, Window):
        return None
    config = eqn.params["padding_config"]
    if any(config[a][0] < 0 or config[a][1] < 0 or config[a][2] != 0 for a in window.axes):
        return None
    others = [(0, 0, 0) if a in window.axes else tuple(c) for a, c in enumerate(config)]

    def prepare(data):
        return jax.vmap(lambda x: lax.pad(x, jnp.asarray(pad_value, x.dtype), others))(data)

    return _shift(ctx, eqn, window, {a: config[a][0] for a in window.axes}, prepare)


@register("slice")
def slice_(ctx: Context, eqn: Equation, values) -> Computed | None:
    (window,) = values
    p = eqn.params
    in_shape = ctx.program.avals[eqn.inputs[0]].shape
    strides = p["strides"] or (1,) * len(in_shape)
    if any(strides[a] != 1 for a in window.axes):
        return None
    starts = list(p["start_indices"])
    limits = list(p["limit_indices"])
    for a, span in zip(window.axes, window.spans, strict=True):
        starts[a], limits[a] = 0, span.count

    def prepare(data):
        return jax.vmap(lambda x: lax.slice(x, starts, limits, strides))(data)

    offsets = {a: -p["start_indices"][a] for a in window.axes}
    return _shift(ctx, eqn, window, offsets, prepare)


# ---------------------------------------------------------------------------
# Sliding windows: convolutions and pooling.


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A sliding-window primitive's geometry, per input axis it slides along."""

    extents: dict[int, int]  # the kernel's extent, dilation included
    strides: dict[int, int]
    pads: dict[int, tuple[int, int]]  # (low, high)
    out_axes: dict[int, int]  # the input axis's position in the output


def sliding_window(
    ctx: Context, eqn: Equation, window: Window, kernel: Kernel, pad_value, apply: Callable
) -> Computed | None:
    """Family: a sliding-window primitive (convolution, pooling) on its windowed input.

    The window grows by the kernel. `apply(regions, pointwise)` computes the
    outputs of the regions, the patched input around each window (padding
    included), or of the window itself when the kernel is one position.
    """
    out_shape = ctx.program.avals[eqn.outputs[0]].shape
    spans = []
    for axis, span in zip(window.axes, window.spans, strict=True):
        (pad_low, _), extent, stride = kernel.pads[axis], kernel.extents[axis], kernel.strides[axis]
        spans.append(span.grown(extent, stride, pad_low, out_shape[kernel.out_axes[axis]]))
    if not ctx.fits(spans):
        return None
    out_axes = tuple(kernel.out_axes[a] for a in window.axes)
    if all(
        kernel.extents[a] == 1 and kernel.strides[a] == 1 and kernel.pads[a] == (0, 0)
        for a in window.axes
    ):  # the output window is the input window
        return _window(apply(window.data, pointwise=True), out_axes, spans)
    padding = tuple(
        kernel.pads[a] if a in window.axes else (0, 0) for a in range(window.data.ndim - 1)
    )
    clean = ctx.lookup(CacheKey(eqn.inputs[0], padding, float(pad_value)))
    out_starts = [span.start(ctx.pixels) for span in spans]
    strides = [kernel.strides[a] for a in window.axes]
    region_starts = [s * stride for s, stride in zip(out_starts, strides, strict=True)]
    region_counts = [
        (span.count - 1) * kernel.strides[a] + kernel.extents[a]
        for span, a in zip(spans, window.axes, strict=True)
    ]
    regions = slices(clean, window.axes, region_starts, region_counts)
    offsets = [kernel.pads[a][0] for a in window.axes]
    regions = ctx.paste(regions, region_starts, window.axes, window, offsets)
    return _window(apply(regions, pointwise=False), out_axes, spans)


def _lowest(dtype):
    dtype = np.dtype(dtype)
    return np.array(-np.inf if np.issubdtype(dtype, np.floating) else np.iinfo(dtype).min, dtype)


def _highest(dtype):
    dtype = np.dtype(dtype)
    return np.array(np.inf if np.issubdtype(dtype, np.floating) else np.iinfo(dtype).max, dtype)


# reduce_window primitives and the value their padding stands for.
REDUCE_WINDOW_PADDING = {
    "reduce_window_sum": lambda dtype: np.zeros((), dtype),
    "reduce_window_max": _lowest,
    "reduce_window_min": _highest,
}


def _pool(ctx: Context, eqn: Equation, operand: Window, pad_value=None, constant_args=()):
    """Pooling; `pad_value` and `constant_args` (the init value) for the generic
    `reduce_window`, whose reducer is one max, min or add."""
    p = eqn.params
    if any(p["base_dilation"][a] != 1 for a in operand.axes):
        return None
    pads = {a: tuple(pad) for a, pad in enumerate(p["padding"])}
    if any(min(pads[a]) < 0 for a in operand.axes):
        return None
    kernel = Kernel(
        extents={
            a: (d - 1) * p["window_dilation"][a] + 1 for a, d in enumerate(p["window_dimensions"])
        },
        strides=dict(enumerate(p["window_strides"])),
        pads=pads,
        out_axes={a: a for a in range(len(pads))},
    )
    padding = tuple((0, 0) if a in operand.axes else pads[a] for a in range(len(pads)))
    if pad_value is None:
        pad_value = REDUCE_WINDOW_PADDING[eqn.primitive.name](
            ctx.program.avals[eqn.inputs[0]].dtype
        )

    def apply(regions, pointwise):
        del pointwise
        args, mapped = [regions, *constant_args], [True] + [False] * len(constant_args)
        out = per_window(eqn, args, mapped, padding=padding)
        return out[0] if eqn.primitive.multiple_results else out

    return sliding_window(ctx, eqn, operand, kernel, pad_value, apply)


@register(*REDUCE_WINDOW_PADDING)
def reduce_window_named(ctx: Context, eqn: Equation, values) -> Computed | None:
    """`reduce_window_sum`, `_max` and `_min` (sum and max pooling)."""
    return _pool(ctx, eqn, values[0])


@register("reduce_window")
def reduce_window(ctx: Context, eqn: Equation, values) -> Computed | None:
    """`lax.reduce_window` with a reducer that is one max, min or add (e.g. a max
    pool written with a custom VJP) and a constant init value: as its
    `reduce_window_*` namesake, padded with the init value."""
    if len(values) != 2 or not isinstance(values[0], Window):
        return None
    operand, init = values
    if isinstance(init, Window | Full):
        return None
    reducer = eqn.params["jaxpr"]
    reducer_eqns = getattr(reducer, "jaxpr", reducer).eqns
    if len(reducer_eqns) != 1 or reducer_eqns[0].primitive.name not in ("max", "min", "add"):
        return None
    try:
        pad_value = float(np.asarray(init))
    except Exception:  # noqa: BLE001 - an init value that is not a constant
        return None
    return _pool(ctx, eqn, operand, pad_value, [init])


def _conv_kernel(eqn: Equation, lhs: Window, rhs) -> Kernel | None:
    """A convolution's geometry along the input's spatial axes; None where the window
    rule does not apply (batch groups, input dilation, a windowed non-spatial axis,
    negative padding on a windowed axis)."""
    p = eqn.params
    dn = p["dimension_numbers"]
    lhs_spatial, rhs_spatial, out_spatial = dn.lhs_spec[2:], dn.rhs_spec[2:], dn.out_spec[2:]
    if p["batch_group_count"] != 1 or any(d != 1 for d in p["lhs_dilation"]):
        return None
    if any(a not in lhs_spatial for a in lhs.axes):
        return None
    rhs_shape = jnp.shape(rhs)
    kernel = Kernel({}, {}, {}, {})
    for i, axis in enumerate(lhs_spatial):
        kernel.extents[axis] = (rhs_shape[rhs_spatial[i]] - 1) * p["rhs_dilation"][i] + 1
        kernel.strides[axis] = p["window_strides"][i]
        kernel.pads[axis] = tuple(p["padding"][i])
        kernel.out_axes[axis] = out_spatial[i]
    if any(min(kernel.pads[a]) < 0 for a in lhs.axes):
        return None
    return kernel


def _convolve_regions(eqn: Equation, rhs, kernel: Kernel, windowed, regions, pointwise):
    """The convolution of each region [k, ...] (its windowed axes' padding included)."""
    lhs_spatial = eqn.params["dimension_numbers"].lhs_spec[2:]
    padding = tuple((0, 0) if axis in windowed else kernel.pads[axis] for axis in lhs_spatial)
    backend = jax.default_backend()
    if pointwise or backend not in thresholds.PADDED_WINDOW_CONVOLUTION_BACKENDS:
        return per_window(eqn, [regions, rhs], [True, False], padding=padding)
    # Padding one windowed axis by a stride and cropping the extra output row.
    axes = [a for a in lhs_spatial if a in windowed][:1]
    padded = tuple(
        (kernel.strides[a], 0) if a in axes else pad
        for a, pad in zip(lhs_spatial, padding, strict=True)
    )
    out = per_window(eqn, [regions, rhs], [True, False], padding=padded)
    for a in axes:
        out = lax.slice_in_dim(out, 1, None, axis=kernel.out_axes[a] + 1)
    return out


@register("conv_general_dilated")
def conv_general_dilated(ctx: Context, eqn: Equation, values) -> Computed | None:
    """A windowed input under a constant kernel: one pixel's stride-1 convolution as
    its clean output window plus the change's convolution (`conv_window_delta`), else
    the output windows from the patched input, else, when those would cover too much
    of the map, the full clean output plus the windows' changes convolved
    (`conv_delta_into_full`)."""
    lhs, rhs = values
    if not isinstance(lhs, Window) or isinstance(rhs, Window):
        return None
    kernel = _conv_kernel(eqn, lhs, rhs)
    if kernel is None:
        return None
    delta = ctx.program.delta_convolutions
    if delta:
        out = conv_window_delta(ctx, eqn, lhs, rhs, kernel)
        if out is not None:
            return out
    apply = functools.partial(_convolve_regions, eqn, rhs, kernel, lhs.axes)
    out = sliding_window(ctx, eqn, lhs, kernel, 0.0, apply)
    if out is None and delta:
        out = conv_delta_into_full(ctx, eqn, lhs, rhs, kernel)
    return out


# ---------------------------------------------------------------------------
# Delta forms of stride-1 convolutions: the clean output plus the windows' change
# convolved. The change is zero outside the input windows, so they cost (input window
# positions) x (kernel taps) multiply-adds per channel pair.


def _takes_delta_form(ctx: Context, eqn: Equation, lhs: Window, kernel: Kernel) -> bool:
    """Whether a convolution can be computed from its input windows' change: stride 1,
    no groups or dilation, every spatial axis windowed, one image."""
    p = eqn.params
    dn = p["dimension_numbers"]
    lhs_spatial = dn.lhs_spec[2:]
    return (
        p["feature_group_count"] == 1
        and all(d == 1 for d in p["rhs_dilation"])
        and set(lhs.axes) == set(lhs_spatial)
        and all(kernel.strides[a] == 1 for a in lhs_spatial)
        and not all(kernel.extents[a] == 1 for a in lhs_spatial)
        and ctx.program.avals[eqn.inputs[0]].shape[dn.lhs_spec[0]] == 1
    )


def _change_buffers(ctx: Context, eqn: Equation, lhs: Window, rhs):
    """Each window's change convolved: (input starts per window span, kernel taps,
    buffers [k, *(window + taps - 1), C_out]), buffer position u of window j being
    output position start_in_j + pad_low - (taps - 1) + u on each spatial axis.

    The change (each input position counted in its first window only) is
    multiplied by every kernel tap in one matrix product, the kernel flipped so
    that tap t of position i lands at buffer position i + t, and the products are
    added into place (col2im)."""
    dn = eqn.params["dimension_numbers"]
    lhs_spatial, rhs_spatial = dn.lhs_spec[2:], dn.rhs_spec[2:]
    in_starts = ctx.starts(lhs)
    change = ctx.change(eqn.inputs[0], lhs, in_starts)  # [k, ...]
    batch, feature = (1 + d for d in dn.lhs_spec[:2])
    change = jnp.transpose(change, (0, batch, *(1 + a for a in lhs_spatial), feature))[:, 0]
    kernel = jnp.transpose(rhs, (*rhs_spatial, dn.rhs_spec[1], dn.rhs_spec[0]))
    taps, channels = kernel.shape[:-2], kernel.shape[-1]
    flipped = kernel[tuple(slice(None, None, -1) for _ in taps)]
    products = jnp.tensordot(change, flipped, axes=[[change.ndim - 1], [len(taps)]])
    sizes = change.shape[1:-1]
    buffers = layers.col2im(
        products.reshape(ctx.k, *sizes, -1),
        (ctx.k, *(s + n - 1 for s, n in zip(sizes, taps, strict=True)), channels),
        (*taps, channels, channels),
        (1,) * len(taps),
        ((0, 0),) * len(taps),
    )
    return in_starts, taps, buffers


def _to_out_layout(change_out, dn):
    """[*spatial, C_out] in (spatial..., feature) order -> [1, ...] in the output's."""
    out_spec = dn.out_spec
    canonical = (out_spec[0], *out_spec[2:], out_spec[1])  # batch, spatial, feature
    return jnp.transpose(change_out[None], [canonical.index(d) for d in range(len(canonical))])


def conv_window_delta(ctx: Context, eqn: Equation, lhs: Window, rhs, kernel: Kernel):
    """A stride-1 convolution on one pixel's window, as the clean output window plus
    the convolution of the window's change (`Form.WINDOW_DELTA`).

    Where the output window computed from its patched region costs (output window
    positions) x (kernel taps): NiN's conv2 reads a 4x4 window under a 5x5 kernel,
    16 against 64 positions. One pixel only: with k windows, the k x k shifted
    reads of each other's changes cost more than they save (docs/benchmarks.md).
    """
    dn = eqn.params["dimension_numbers"]
    lhs_spatial = dn.lhs_spec[2:]
    if ctx.k != 1 or not _takes_delta_form(ctx, eqn, lhs, kernel):
        return None
    order = [lhs.axes.index(a) for a in lhs_spatial]  # spatial axis -> window span
    out_shape = ctx.program.avals[eqn.outputs[0]].shape
    out_spans = [
        lhs.spans[i].grown(kernel.extents[a], 1, kernel.pads[a][0], out_shape[kernel.out_axes[a]])
        for i, a in zip(order, lhs_spatial, strict=True)
    ]
    if not ctx.fits(out_spans):
        return None
    in_positions = math.prod(span.count for span in lhs.spans)
    if in_positions == 1:  # the pixel itself (a first layer): its window rule is as cheap
        return None
    out_positions = math.prod(span.count for span in out_spans)
    if in_positions > thresholds.DELTA_MAX_INPUT_SHARE * out_positions:
        return None
    in_starts, taps, buffers = _change_buffers(ctx, eqn, lhs, rhs)
    buffer = buffers[0]
    # The output window: its clean values plus the buffer read at its place from a
    # margin of zeros (a window's start is clamped into the map; the buffer's is not).
    out_counts = [span.count for span in out_spans]
    margin = [(c, c, 0) for c in out_counts] + [(0, 0, 0)]
    padded = lax.pad(buffer, jnp.zeros((), buffer.dtype), margin)
    index = []
    for d, a in enumerate(lhs_spatial):
        base = in_starts[order[d]][0] + kernel.pads[a][0] - (taps[d] - 1)
        start = out_spans[d].start(ctx.pixels)[0]
        limit = padded.shape[d] - out_counts[d]
        index.append(jnp.clip(start - base + out_counts[d], 0, limit))
    change_out = lax.dynamic_slice(padded, [*index, 0], [*out_counts, padded.shape[-1]])
    change_out = _to_out_layout(change_out, dn)
    out_axes = tuple(kernel.out_axes[a] for a in lhs.axes)
    spans = tuple(out_spans[lhs_spatial.index(a)] for a in lhs.axes)
    clean_out = slices(
        ctx.lookup(CacheKey(eqn.outputs[0])),
        out_axes,
        [span.start(ctx.pixels) for span in spans],
        [span.count for span in spans],
    )
    data = clean_out + change_out[None].astype(clean_out.dtype)
    return Computed([Window(data, out_axes, spans)], Form.WINDOW_DELTA)


def conv_delta_into_full(ctx: Context, eqn: Equation, lhs: Window, rhs, kernel: Kernel):
    """A stride-1 convolution whose output windows would cover too much of its map
    (k pixels, or grown windows), as the full clean output plus every window's
    change convolved and added into place (`Form.FULL_DELTA`).

    Where the full convolution costs (output map positions) x (kernel taps):
    NiN's conv2 at k = 3 reads three 4x4 windows of pool1's 16x16 map under a
    5x5 kernel, 48 against 256 positions. Taken when that share is at most
    `DELTA_FULL_MAX_INPUT_SHARE` (k > 1) or `DELTA_FULL_MAX_INPUT_SHARE_ONE_WINDOW`
    (one pixel: NiN's conv3, a 5x5 window of an 8x8 map under a 3x3 kernel).
    """
    dn = eqn.params["dimension_numbers"]
    lhs_spatial = dn.lhs_spec[2:]
    out_shape = ctx.program.avals[eqn.outputs[0]].shape
    out_sizes = [out_shape[a] for a in dn.out_spec[2:]]
    if len(lhs_spatial) != 2 or not _takes_delta_form(ctx, eqn, lhs, kernel):
        return None
    in_positions = ctx.k * math.prod(span.count for span in lhs.spans)
    share = (
        thresholds.DELTA_FULL_MAX_INPUT_SHARE_ONE_WINDOW
        if ctx.k == 1
        else thresholds.DELTA_FULL_MAX_INPUT_SHARE
    )
    if in_positions > share * math.prod(out_sizes):
        return None
    order = [lhs.axes.index(a) for a in lhs_spatial]  # spatial axis -> window span
    in_starts, taps, buffers = _change_buffers(ctx, eqn, lhs, rhs)
    buffer_sizes = buffers.shape[1:-1]
    # Each buffer moved into place and summed by one-hot matrix products (a scatter
    # or a dynamic update per window measured slower): buffer position u of window j
    # is output position base_j + u on each axis, and positions past the map's
    # border (where the kernel reaches) drop out.
    placements = []
    for d, a in enumerate(lhs_spatial):
        base = in_starts[order[d]] + kernel.pads[a][0] - (taps[d] - 1)  # [k]
        target = base[:, None] + jnp.arange(buffer_sizes[d])[None, :]  # [k, buffer]
        one_hot = jnp.arange(out_sizes[d])[None, :, None] == target[:, None, :]
        placements.append(one_hot.astype(buffers.dtype))  # [k, out, buffer]
    rows, cols = placements
    moved = jnp.einsum("joh,jhwc->jowc", rows, buffers)
    change_out = jnp.einsum("jowc,jpw->opc", moved, cols)  # [*out_sizes, C_out]
    change_out = _to_out_layout(change_out, dn)
    clean_out = ctx.lookup(CacheKey(eqn.outputs[0]))
    return Computed([Full(clean_out + change_out.astype(clean_out.dtype))], Form.FULL_DELTA)
