"""Evaluate pixel candidates by recomputing only what the changed pixels reach.

A candidate differs from its clean image in k pixels. A convolution changes
only a window around each changed pixel, and the window grows layer by layer,
so most of a full forward pass recomputes values the pixels cannot have
changed. This module is a transformation of any model's computation, read
from the jaxpr of `apply_fn(params, images)` traced for one image:

- the *clean pass* evaluates the jaxpr on the clean image and keeps the
  input-dependent maps that the incremental pass reads as context (the
  activation cache, one per in-flight image);
- the *incremental pass*, written for one candidate and vmapped over the
  population and the slots, carries for each changed pixel a window of static
  size and dynamic position through the jaxpr. Elementwise operations keep the
  window (operands that do not depend on the image are sliced at it; other
  cached maps are re-windowed from the cache). Convolutions and pooling
  (`conv_general_dilated`, `reduce_window_*`) grow it by their kernel, stride,
  dilation and padding, and compute on a slice of the patched input, read from
  the cached clean map. With one pixel, a stride-1 convolution is instead
  the cached clean output plus the convolution of the window's change, which
  is zero outside the input window: (input window) x (taps) multiply-adds,
  not (output window) x (taps). With k pixels, a stride-1 convolution whose output
  windows would cover most of its map, but whose k input windows are small, is
  the cached clean output map plus the windows' changes convolved, moved into
  place by one-hot matrix products. A global sum over the window's axes (global average
  pooling) is updated from the window alone: clean sum + the window's change.
  Calls (`jit`, `custom_jvp_call`, `custom_vjp_call`, `remat`, ...) are
  inlined. Any other operation on a windowed value, and any layer whose
  windows would cover most of the map, switches to the full computation from
  there on: the full map is the cached clean map with the windows written in.

It is never wrong, only slower: every path computes the exact patched values,
up to float rounding. Why a jaxpr transformation rather than a layer-graph
description shared by the zoo and the importers: it works unchanged for any
JAX model, including users' own Flax modules and future importers, and the
full and incremental evaluators read the same computation (STYLE.md, "one
description, several interpreters").

Window geometry. Along each windowed axis a window follows one pixel
coordinate p (row or column). The positions it may change are
[ceil((p + low) / stride), floor((p + high) / stride)], with integers fixed at
trace time: a kernel of extent e, stride s and low padding l maps (low, high,
stride) to (low + stride (l - e + 1), high + stride l, stride s). The window
has the static length `count` (the most positions that interval can hold,
capped at the map size) and starts at the interval's first position, clamped
so the window stays inside the map.
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
from jax import lax

from opa_jax import de
from opa_jax.errors import InputError
from opa_jax.models import layers

try:  # jax >= 0.4.30
    from jax.extend import core as jax_core
except ImportError:  # pragma: no cover
    from jax import core as jax_core

EVALUATORS = ("auto", "full", "incremental")

# Primitives whose sub-computation is inlined: (name, parameter holding the jaxpr).
_CALLS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat": "jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
}

# Primitives that act on each position on their own (all operands of one shape, or
# broadcast from size 1).
_ELEMENTWISE = frozenset(
    """abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp convert_element_type
    copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt imag
    integer_pow is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not or
    pow real reduce_precision rem round rsqrt select_n sign sin sinh sqrt square sub tan tanh
    xor""".split()
)

# reduce_window primitives and the value their padding stands for.
_REDUCE_WINDOWS = {
    "reduce_window_sum": lambda dtype: np.zeros((), dtype),
    "reduce_window_max": lambda dtype: _lowest(dtype),
    "reduce_window_min": lambda dtype: _highest(dtype),
}

# Windows whose total size is above this share of the map are computed in full.
DEFAULT_MAX_WINDOW_FRACTION = 0.5

# A one-pixel convolution is the clean output plus the change's convolution when its
# input window has at most this share of its output window's positions (NiN's conv2:
# 4x4 under 8x8). Above it (3x3 kernels on grown windows, e.g. ResNet's 5x5 -> 7x7),
# the matrix product and col2im on small maps measured slower than the window rule
# (docs/benchmarks.md, "Delta convolutions").
DELTA_MAX_INPUT_SHARE = 0.25

# A convolution whose output windows would cover too much of the map is the full clean
# output plus the windows' changes convolved (`_Pass._delta_into_full`) when the k input
# windows hold at most this share of the output map's positions (NiN's conv2 at k = 3:
# 48 of 256); otherwise it runs in full. The products and col2im of k windows cost
# about k times one window's, and NiN's conv2 at k = 5 (80 of 256) measured slower than
# in full; one window (k = 1) is cheaper to add in, and NiN's conv3 (a 5x5 window of
# an 8x8 map, 25 of 64) measured 1.25x as fast, so one window may hold a larger share
# (docs/benchmarks.md, "Delta convolutions into the full map").
DELTA_FULL_MAX_INPUT_SHARE = 0.25
DELTA_FULL_MAX_INPUT_SHARE_ONE_WINDOW = 0.4


def _lowest(dtype):
    dtype = np.dtype(dtype)
    return np.array(-np.inf if np.issubdtype(dtype, np.floating) else np.iinfo(dtype).min, dtype)


def _highest(dtype):
    dtype = np.dtype(dtype)
    return np.array(np.inf if np.issubdtype(dtype, np.floating) else np.iinfo(dtype).max, dtype)


# ---------------------------------------------------------------------------
# The model's computation as a flat list of equations.


@dataclasses.dataclass(frozen=True)
class Literal:
    """A constant operand written into an equation."""

    value: Any


@dataclasses.dataclass(frozen=True, eq=False)
class Equation:
    primitive: Any
    inputs: tuple  # var ids (int) or Literal
    outputs: tuple[int, ...]
    params: dict


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
    """`apply_fn` traced for one image, calls inlined; var ids index `avals`.

    Hashable by identity, so it can be a static argument of jit; `program_for`
    returns the same object for the same model and shapes.
    """

    equations: tuple[Equation, ...]
    avals: tuple  # [num_vars] jax ShapedArray of each var
    constants: dict  # var id -> value (the jaxpr's closed-over constants)
    param_vars: tuple[int, ...]  # the params' leaves, in tree order
    image_var: int  # [1, H, W, C]
    output_var: int  # [1, num_classes]
    params_treedef: Any
    num_pixels: int
    max_window_fraction: float
    depends: frozenset  # vars that depend on the image
    delta_convolutions: bool = True  # stride-1 convolutions as clean output + change
    cache_keys: tuple = ()  # the clean maps the incremental pass reads (CacheKey)
    steps: tuple = ()  # how each input-dependent equation is computed (Step)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.avals[self.image_var].shape[1:])


def _flatten(closed) -> tuple[list[Equation], list, dict, list[int], list[int]]:
    """Inlines calls; returns equations, avals, constants, input var ids, output refs."""
    equations: list[Equation] = []
    avals: list = []
    constants: dict = {}

    def new_var(aval) -> int:
        avals.append(aval)
        return len(avals) - 1

    def inline(jaxpr, consts, inputs) -> list:
        names = {}
        for var, value in zip(jaxpr.constvars, consts, strict=True):
            names[var] = new_var(var.aval)
            constants[names[var]] = value
        for var, ref in zip(jaxpr.invars, inputs, strict=True):
            names[var] = ref

        def read(atom):
            if isinstance(atom, jax_core.Literal):
                return Literal(atom.val)
            return names[atom]

        for eqn in jaxpr.eqns:
            ins = [read(atom) for atom in eqn.invars]
            key = _CALLS.get(eqn.primitive.name)
            sub = eqn.params.get(key) if key else None
            if sub is not None:
                if isinstance(sub, jax_core.ClosedJaxpr):
                    outs = inline(sub.jaxpr, sub.consts, ins)
                else:
                    outs = inline(sub, (), ins)
                for var, ref in zip(eqn.outvars, outs, strict=True):
                    names[var] = ref
                continue
            outs = tuple(new_var(var.aval) for var in eqn.outvars)
            for var, ref in zip(eqn.outvars, outs, strict=True):
                names[var] = ref
            equations.append(Equation(eqn.primitive, tuple(ins), outs, dict(eqn.params)))
        return [read(atom) for atom in jaxpr.outvars]

    inputs = [new_var(var.aval) for var in closed.jaxpr.invars]
    outputs = inline(closed.jaxpr, closed.consts, inputs)
    return equations, avals, constants, inputs, outputs


def trace(
    apply_fn: Callable,
    params,
    image_shape,
    num_pixels: int,
    max_window_fraction: float = DEFAULT_MAX_WINDOW_FRACTION,
    delta_convolutions: bool = True,
) -> Program:
    """The program of `apply_fn` for one image of `image_shape`, and its cache keys."""
    param_structs = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    image = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    closed = jax.make_jaxpr(apply_fn)(param_structs, image)
    equations, avals, constants, inputs, outputs = _flatten(closed)
    if len(outputs) != 1 or isinstance(outputs[0], Literal):
        raise InputError("the incremental evaluator needs apply_fn to return one logits array")
    depends = {inputs[-1]}
    for eqn in equations:
        if any(not isinstance(ref, Literal) and ref in depends for ref in eqn.inputs):
            depends.update(eqn.outputs)
    program = Program(
        equations=tuple(equations),
        avals=tuple(avals),
        constants=constants,
        param_vars=tuple(inputs[:-1]),
        image_var=inputs[-1],
        output_var=outputs[0],
        params_treedef=jax.tree.structure(params),
        num_pixels=num_pixels,
        max_window_fraction=max_window_fraction,
        depends=frozenset(depends),
        delta_convolutions=delta_convolutions,
    )
    cache_keys, steps = _record(program, param_structs)
    return dataclasses.replace(program, cache_keys=cache_keys, steps=steps)


def _params_signature(params):
    leaves, treedef = jax.tree.flatten(params)
    return treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)


_PROGRAMS: dict = {}


def program_for(apply_fn, params, image_shape, num_pixels: int, **options) -> Program:
    """`trace`, memoised on the model's function, parameter shapes and pixel count."""
    key = (apply_fn, _params_signature(params), tuple(image_shape), num_pixels,
           tuple(sorted(options.items())))  # fmt: skip
    if key not in _PROGRAMS:
        _PROGRAMS[key] = trace(apply_fn, params, image_shape, num_pixels, **options)
    return _PROGRAMS[key]


# ---------------------------------------------------------------------------
# The clean pass.


@dataclasses.dataclass(frozen=True)
class CacheKey:
    """A clean map the incremental pass reads: a var, padded on each axis with `value`."""

    var: int
    padding: tuple[tuple[int, int], ...] | None = None
    value: float = 0.0

    @property
    def name(self) -> str:
        if self.padding is None:
            return f"v{self.var}"
        pads = ",".join(f"{lo}:{hi}" for lo, hi in self.padding)
        return f"v{self.var}[{pads}]={self.value}"

    def shape(self, program: Program) -> tuple[int, ...]:
        shape = program.avals[self.var].shape
        if self.padding is None:
            return tuple(shape)
        return tuple(d + lo + hi for d, (lo, hi) in zip(shape, self.padding, strict=True))


def _read(env, ref):
    return ref.value if isinstance(ref, Literal) else env[ref]


def _bind(eqn: Equation, *values):
    out = eqn.primitive.bind(*values, **eqn.params)
    return out if eqn.primitive.multiple_results else [out]


def evaluate(program: Program, params, image) -> dict:
    """Every var's value for one image [H, W, C] (the full forward pass, kept)."""
    env = dict(program.constants)
    env.update(zip(program.param_vars, jax.tree.leaves(params), strict=True))
    env[program.image_var] = jnp.asarray(image, jnp.float32)[None]
    for eqn in program.equations:
        outs = _bind(eqn, *[_read(env, ref) for ref in eqn.inputs])
        env.update(zip(eqn.outputs, outs, strict=True))
    return env


def clean_activations(program: Program, params, image) -> dict[str, jax.Array]:
    """The activation cache of one clean image [H, W, C]: {key name: clean map}."""
    env = evaluate(program, params, image)
    cache = {}
    for key in program.cache_keys:
        value = env[key.var]
        if key.padding is not None:
            fill = jnp.asarray(key.value, value.dtype)
            value = lax.pad(value, fill, [(lo, hi, 0) for lo, hi in key.padding])
        cache[key.name] = value
    return cache


def cache_bytes(program: Program) -> int:
    """Bytes of one image's activation cache."""
    return sum(
        math.prod(key.shape(program)) * np.dtype(program.avals[key.var].dtype).itemsize
        for key in program.cache_keys
    )


# ---------------------------------------------------------------------------
# Window geometry.


@dataclasses.dataclass(frozen=True)
class Span:
    """One windowed axis of a map of length `size` (see the module docstring)."""

    size: int
    low: int
    high: int
    stride: int
    coordinate: int  # which pixel coordinate it follows: 0 row, 1 column

    @property
    def count(self) -> int:
        return min(self.size, (self.high - self.low) // self.stride + 1)

    def start(self, pixels) -> jax.Array:
        """Window starts, [k] int32, from the pixels' coordinates [k, 2]."""
        first = -((-(pixels[:, self.coordinate] + self.low)) // self.stride)  # ceil division
        return jnp.clip(first, 0, self.size - self.count)

    def grown(self, extent: int, stride: int, pad_low: int, out_size: int) -> Span:
        """The span of a kernel's output over this span's input."""
        return Span(
            size=out_size,
            low=self.low + self.stride * (pad_low - extent + 1),
            high=self.high + self.stride * pad_low,
            stride=self.stride * stride,
            coordinate=self.coordinate,
        )

    def shifted(self, offset: int, size: int) -> Span:
        """Positions moved by `offset` (padding, cropping) on a map of length `size`."""
        return dataclasses.replace(
            self, size=size, low=self.low + self.stride * offset,
            high=self.high + self.stride * offset,
        )  # fmt: skip


@dataclasses.dataclass
class Window:
    """An input-dependent value equal to its clean map except inside k windows."""

    data: jax.Array  # [k, *shape with each windowed axis cut to its span's count]
    axes: tuple[int, ...]  # positions of the windowed axes in the map's shape
    spans: tuple[Span, ...]


@dataclasses.dataclass
class Full:
    """An input-dependent value computed in full (for this candidate)."""

    value: jax.Array


class _Pass:
    """The incremental pass for one candidate: window rules per primitive."""

    def __init__(self, program: Program, lookup: Callable, pixels):
        self.program = program
        self.lookup = lookup  # CacheKey -> clean map
        self.pixels = pixels  # [k, 2] int32 row, column
        self.k = pixels.shape[0]
        self.delta = False  # the last equation was a global sum updated by its change

    # -- helpers ---------------------------------------------------------

    def starts(self, window: Window) -> list[jax.Array]:
        return [span.start(self.pixels) for span in window.spans]

    def fits(self, spans) -> bool:
        """Whether windows of these spans are worth computing apart from the full map."""
        counts = math.prod(span.count for span in spans)
        sizes = math.prod(span.size for span in spans)
        if all(span.count == span.size for span in spans):
            return False
        return self.k * counts <= self.program.max_window_fraction * sizes

    def slices(self, array, axes, starts, counts) -> jax.Array:
        """Each window's slice of a map (one per window) -> [k, ...]."""

        def one(window_starts):
            index = [0] * array.ndim
            sizes = list(array.shape)
            for i, axis in enumerate(axes):
                index[axis] = window_starts[i]
                sizes[axis] = counts[i]
            return lax.dynamic_slice(array, index, sizes)

        return jax.vmap(one)(jnp.stack(starts, -1))

    def paste(self, regions, region_starts, axes, window: Window, offsets=None) -> jax.Array:
        """Writes every window's values into every region.

        regions [k, ...]: slices of a clean map starting at `region_starts` (per
        axis, [k]); the windows sit at their starts plus `offsets` (per axis) in
        the regions' coordinates. Windows may overlap a region partly or not at all.
        """
        window_starts = self.starts(window)
        if offsets is not None:
            window_starts = [s + o for s, o in zip(window_starts, offsets, strict=True)]
        window_starts = jnp.stack(window_starts, -1)  # [k, axes]

        def one(region, starts):
            for j in range(self.k):
                values = window.data[j]
                mask = None
                for i, axis in enumerate(axes):
                    length, count = region.shape[axis], values.shape[axis]
                    position = jnp.arange(length) + starts[i] - window_starts[j, i]
                    inside = (position >= 0) & (position < count)
                    values = jnp.take(
                        values, jnp.clip(position, 0, count - 1), axis=axis,
                        mode="clip",
                    )  # fmt: skip
                    inside = inside.reshape([-1 if d == axis else 1 for d in range(region.ndim)])
                    mask = inside if mask is None else mask & inside
                region = jnp.where(mask, values, region)
            return region

        return jax.vmap(one)(regions, jnp.stack(region_starts, -1))

    def materialize(self, var: int, value) -> jax.Array:
        """The full map of an input-dependent value for this candidate."""
        if isinstance(value, Full):
            return value.value
        full = self.lookup(CacheKey(var))
        starts = self.starts(value)
        for j in range(self.k):
            index = [0] * full.ndim
            for axis, start in zip(value.axes, starts, strict=True):
                index[axis] = start[j]
            full = lax.dynamic_update_slice(full, value.data[j], index)
        return full

    def rewindow(self, var: int, value: Window, spans) -> jax.Array:
        """A window's data on other spans of the same map -> [k, ...]."""
        if tuple(spans) == tuple(value.spans):
            return value.data
        clean = self.lookup(CacheKey(var))
        starts = [span.start(self.pixels) for span in spans]
        regions = self.slices(clean, value.axes, starts, [span.count for span in spans])
        return self.paste(regions, starts, value.axes, value)

    def full(self, eqn: Equation, values):
        """Falls back to the full computation for this equation."""
        args = [
            self.materialize(ref, value) if isinstance(value, Window | Full) else value
            for ref, value in zip(eqn.inputs, values, strict=True)
        ]
        return [Full(out) for out in _bind(eqn, *args)]

    def per_window(self, eqn: Equation, args, mapped, **params):
        """Binds the primitive once per window; `mapped` marks args with a window axis."""
        fn = functools.partial(eqn.primitive.bind, **{**eqn.params, **params})
        in_axes = [0 if m else None for m in mapped]
        return jax.vmap(fn, in_axes=in_axes)(*args)

    # -- rules -----------------------------------------------------------

    def equation(self, eqn: Equation, values) -> list:
        self.delta = False
        name = eqn.primitive.name
        if name in _ELEMENTWISE:
            return self.elementwise(eqn, values)
        rule = getattr(self, "rule_" + name, None)
        if rule is not None and not any(isinstance(v, Full) for v in values):
            out = rule(eqn, values)
            if out is not None:
                return out
        return self.full(eqn, values)

    def elementwise(self, eqn: Equation, values):
        if any(isinstance(v, Full) for v in values):
            return self.full(eqn, values)
        windows = [(ref, v) for ref, v in zip(eqn.inputs, values, strict=True)
                   if isinstance(v, Window)]  # fmt: skip
        axes = windows[0][1].axes
        if any(v.axes != axes for _, v in windows):
            return self.full(eqn, values)
        spans = []
        for i in range(len(axes)):
            group = {v.spans[i] for _, v in windows}
            first = next(iter(group))
            if any((s.size, s.stride, s.coordinate) != (first.size, first.stride, first.coordinate)
                   for s in group):  # fmt: skip
                return self.full(eqn, values)
            low, high = min(s.low for s in group), max(s.high for s in group)
            spans.append(dataclasses.replace(first, low=low, high=high))
        if not self.fits(spans):
            return self.full(eqn, values)
        starts = [span.start(self.pixels) for span in spans]
        counts = [span.count for span in spans]
        args, mapped = [], []
        for ref, value in zip(eqn.inputs, values, strict=True):
            if isinstance(value, Window):
                args.append(self.rewindow(ref, value, spans))
                mapped.append(True)
                continue
            value = jnp.asarray(value)
            if value.ndim and any(value.shape[a] != 1 for a in axes):  # a static map: slice it
                args.append(self.slices(value, axes, starts, counts))
                mapped.append(True)
            else:
                args.append(value)
                mapped.append(False)
        out = self.per_window(eqn, args, mapped)
        return [Window(out, axes, tuple(spans))]

    def _local(self, eqn, values, out_axes_of, extents, strides, pads, pad_value,
               out_shape, apply):  # fmt: skip
        """A sliding-window primitive (convolution, pooling) on its windowed input.

        `extents`, `strides`, `pads` give each windowed input axis's kernel
        geometry; `apply(regions, mapped_params)` computes the outputs of the
        regions (the patched input around each window, padding included).
        """
        ref, window = eqn.inputs[0], values[0]
        spans = []
        for axis, span in zip(window.axes, window.spans, strict=True):
            (pad_low, _), extent, stride = pads[axis], extents[axis], strides[axis]
            spans.append(span.grown(extent, stride, pad_low, out_shape[out_axes_of[axis]]))
        if not self.fits(spans):
            return None
        out_axes = tuple(out_axes_of[a] for a in window.axes)
        pointwise = all(
            extents[a] == 1 and strides[a] == 1 and pads[a] == (0, 0) for a in window.axes
        )
        if pointwise:  # the output window is the input window
            return [Window(apply(window.data, pointwise=True), out_axes, tuple(spans))]
        padding = tuple(
            pads[a] if a in window.axes else (0, 0) for a in range(window.data.ndim - 1)
        )
        clean = self.lookup(CacheKey(ref, padding, float(pad_value)))
        out_starts = [span.start(self.pixels) for span in spans]
        region_starts = [s * strides[a] for s, a in zip(out_starts, window.axes, strict=True)]
        region_counts = [
            (span.count - 1) * strides[a] + extents[a]
            for span, a in zip(spans, window.axes, strict=True)
        ]
        regions = self.slices(clean, window.axes, region_starts, region_counts)
        offsets = [pads[a][0] for a in window.axes]
        regions = self.paste(regions, region_starts, window.axes, window, offsets)
        return [Window(apply(regions, pointwise=False), out_axes, tuple(spans))]

    def rule_conv_general_dilated(self, eqn, values):
        lhs, rhs = values
        if not isinstance(lhs, Window) or isinstance(rhs, Window):
            return None
        p = eqn.params
        dn = p["dimension_numbers"]
        lhs_spatial, rhs_spatial, out_spatial = dn.lhs_spec[2:], dn.rhs_spec[2:], dn.out_spec[2:]
        if p["batch_group_count"] != 1 or any(d != 1 for d in p["lhs_dilation"]):
            return None
        if any(a not in lhs_spatial for a in lhs.axes):
            return None
        rhs_shape = jnp.shape(rhs)
        extents, strides, pads, out_axes_of = {}, {}, {}, {}
        for i, axis in enumerate(lhs_spatial):
            kernel = rhs_shape[rhs_spatial[i]]
            extents[axis] = (kernel - 1) * p["rhs_dilation"][i] + 1
            strides[axis] = p["window_strides"][i]
            pads[axis] = tuple(p["padding"][i])
            out_axes_of[axis] = out_spatial[i]
        if any(min(pads[a]) < 0 for a in lhs.axes):
            return None
        padding = tuple(
            (0, 0) if axis in lhs.axes else pads[axis] for axis in lhs_spatial
        )  # the region carries the windowed axes' padding

        def apply(regions, pointwise):
            if pointwise or jax.default_backend() != "cpu":
                return self.per_window(eqn, [regions, rhs], [True, False], padding=padding)
            # XLA's CPU convolutions (YNNPACK, jax 0.10) ran unpadded spatial kernels at
            # a third to a half of the speed of padded ones; padding one windowed axis by
            # a stride and cropping the extra output row is faster (docs/benchmarks.md).
            axes = [a for a in lhs_spatial if a in lhs.axes][:1]
            padded = tuple(
                (strides[a], 0) if a in axes else pad
                for a, pad in zip(lhs_spatial, padding, strict=True)
            )
            out = self.per_window(eqn, [regions, rhs], [True, False], padding=padded)
            for a in axes:
                out = lax.slice_in_dim(out, 1, None, axis=out_axes_of[a] + 1)
            return out

        out_shape = self.program.avals[eqn.outputs[0]].shape
        if self.program.delta_convolutions:
            out = self._delta_convolution(eqn, lhs, rhs, extents, strides, pads, out_axes_of)
            if out is not None:
                return out
        out = self._local(eqn, values, out_axes_of, extents, strides, pads, 0.0,
                          out_shape, apply)  # fmt: skip
        if out is None and self.program.delta_convolutions:
            out = self._delta_into_full(eqn, lhs, rhs, extents, strides, pads)
        return out

    def _takes_delta_form(self, eqn, lhs: Window, extents, strides) -> bool:
        """Whether a convolution can be computed from its input windows' change: 2-D,
        stride 1, no groups or dilation, every spatial axis windowed, one image."""
        p = eqn.params
        dn = p["dimension_numbers"]
        lhs_spatial = dn.lhs_spec[2:]
        return (
            p["feature_group_count"] == 1
            and all(d == 1 for d in p["rhs_dilation"])
            and set(lhs.axes) == set(lhs_spatial)
            and all(strides[a] == 1 for a in lhs_spatial)
            and not all(extents[a] == 1 for a in lhs_spatial)
            and self.program.avals[eqn.inputs[0]].shape[dn.lhs_spec[0]] == 1
        )

    def _change_buffers(self, eqn, lhs: Window, rhs):
        """Each window's change convolved: (input starts per window span, kernel taps,
        buffers [k, *(window + taps - 1), C_out]), buffer position u of window j being
        output position start_in_j + pad_low - (taps - 1) + u on each spatial axis.

        The change (each input position counted in its first window only) is
        multiplied by every kernel tap in one matrix product, the kernel flipped so
        that tap t of position i lands at buffer position i + t, and the products are
        added into place (col2im)."""
        dn = eqn.params["dimension_numbers"]
        lhs_spatial, rhs_spatial = dn.lhs_spec[2:], dn.rhs_spec[2:]
        in_starts = self.starts(lhs)
        clean_in = self.slices(self.lookup(CacheKey(eqn.inputs[0])), lhs.axes, in_starts,
                               [span.count for span in lhs.spans])  # fmt: skip
        change = lhs.data - clean_in  # [k, ...]
        if self.k > 1:  # a position inside an earlier window is counted there
            change = jnp.where(self._first_cover(lhs), change, 0)
        batch, feature = (1 + d for d in dn.lhs_spec[:2])
        change = jnp.transpose(change, (0, batch, *(1 + a for a in lhs_spatial), feature))[:, 0]
        kernel = jnp.transpose(rhs, (*rhs_spatial, dn.rhs_spec[1], dn.rhs_spec[0]))
        taps, channels = kernel.shape[:-2], kernel.shape[-1]
        flipped = kernel[tuple(slice(None, None, -1) for _ in taps)]
        products = jnp.tensordot(change, flipped, axes=[[change.ndim - 1], [len(taps)]])
        sizes = change.shape[1:-1]
        buffers = layers.col2im(
            products.reshape(self.k, *sizes, -1),
            (self.k, *(s + n - 1 for s, n in zip(sizes, taps, strict=True)), channels),
            (*taps, channels, channels), (1,) * len(taps), ((0, 0),) * len(taps),
        )  # fmt: skip
        return in_starts, taps, buffers

    def _delta_into_full(self, eqn, lhs: Window, rhs, extents, strides, pads):
        """A stride-1 convolution whose output windows would cover too much of its map
        (k pixels, or grown windows), as the full clean output plus every window's
        change convolved and added into place.

        The windows' changes (each input position counted in its first window only)
        are zero elsewhere, so this costs k x (input window positions) x (kernel taps)
        multiply-adds per channel pair, where the full convolution costs (output map
        positions) x (kernel taps): NiN's conv2 at k = 3 reads three 4x4 windows of
        pool1's 16x16 map under a 5x5 kernel, 48 against 256 positions. Taken when
        that share is at most `DELTA_FULL_MAX_INPUT_SHARE` (k > 1) or
        `DELTA_FULL_MAX_INPUT_SHARE_ONE_WINDOW` (one pixel: NiN's conv3, a 5x5 window
        of an 8x8 map under a 3x3 kernel).
        """
        dn = eqn.params["dimension_numbers"]
        lhs_spatial = dn.lhs_spec[2:]
        out_shape = self.program.avals[eqn.outputs[0]].shape
        out_sizes = [out_shape[a] for a in dn.out_spec[2:]]
        if len(lhs_spatial) != 2 or not self._takes_delta_form(eqn, lhs, extents, strides):
            return None
        in_positions = self.k * math.prod(span.count for span in lhs.spans)
        share = DELTA_FULL_MAX_INPUT_SHARE_ONE_WINDOW if self.k == 1 else DELTA_FULL_MAX_INPUT_SHARE
        if in_positions > share * math.prod(out_sizes):
            return None
        order = [lhs.axes.index(a) for a in lhs_spatial]  # spatial axis -> window span
        in_starts, taps, buffers = self._change_buffers(eqn, lhs, rhs)
        buffer_sizes = buffers.shape[1:-1]
        # Each buffer moved into place and summed by one-hot matrix products (a scatter
        # or a dynamic update per window measured slower): buffer position u of window j
        # is output position base_j + u on each axis, and positions past the map's
        # border (where the kernel reaches) drop out.
        placements = []
        for d, a in enumerate(lhs_spatial):
            base = in_starts[order[d]] + pads[a][0] - (taps[d] - 1)  # [k]
            target = base[:, None] + jnp.arange(buffer_sizes[d])[None, :]  # [k, buffer]
            placements.append(
                (jnp.arange(out_sizes[d])[None, :, None] == target[:, None, :]).astype(
                    buffers.dtype
                )
            )  # [k, out, buffer]
        rows, cols = placements
        moved = jnp.einsum("joh,jhwc->jowc", rows, buffers)
        change_out = jnp.einsum("jowc,jpw->opc", moved, cols)  # [*out_sizes, C_out]
        out_spec = dn.out_spec
        canonical = (out_spec[0], *out_spec[2:], out_spec[1])  # batch, spatial, feature
        change_out = jnp.transpose(change_out[None], [canonical.index(d)
                                                      for d in range(len(canonical))])  # fmt: skip
        clean_out = self.lookup(CacheKey(eqn.outputs[0]))
        self.delta = True
        return [Full(clean_out + change_out.astype(clean_out.dtype))]

    def _delta_convolution(self, eqn, lhs: Window, rhs, extents, strides, pads, out_axes_of):
        """A stride-1 convolution on one pixel's window, as the clean output plus the
        convolution of the window's change.

        The change is zero outside the input window, so it costs (input window
        positions) x (kernel taps) multiply-adds per channel pair, where the
        output window computed from its patched region costs (output window
        positions) x (kernel taps): NiN's conv2 reads a 4x4 window under a 5x5
        kernel, 16 against 64 positions. The change is multiplied by every
        kernel tap in one matrix product and the products are added into place
        (col2im). One pixel only: with k windows, the k x k shifted reads of
        each other's changes cost more than they save (docs/benchmarks.md).
        """
        dn = eqn.params["dimension_numbers"]
        lhs_spatial = dn.lhs_spec[2:]
        if self.k != 1 or not self._takes_delta_form(eqn, lhs, extents, strides):
            return None
        order = [lhs.axes.index(a) for a in lhs_spatial]  # spatial axis -> window span
        out_shape = self.program.avals[eqn.outputs[0]].shape
        out_spans = [
            lhs.spans[i].grown(extents[a], 1, pads[a][0], out_shape[out_axes_of[a]])
            for i, a in zip(order, lhs_spatial, strict=True)
        ]
        if not self.fits(out_spans):
            return None
        in_positions = math.prod(span.count for span in lhs.spans)
        if in_positions == 1:  # the pixel itself (a first layer): its window rule is as cheap
            return None
        if in_positions > DELTA_MAX_INPUT_SHARE * math.prod(span.count for span in out_spans):
            return None
        in_starts, taps, buffers = self._change_buffers(eqn, lhs, rhs)
        buffer = buffers[0]
        # The output window: its clean values plus the buffer read at its place from a
        # margin of zeros (a window's start is clamped into the map; the buffer's is not).
        out_counts = [span.count for span in out_spans]
        margin = [(c, c, 0) for c in out_counts] + [(0, 0, 0)]
        padded = lax.pad(buffer, jnp.zeros((), buffer.dtype), margin)
        index = []
        for d, a in enumerate(lhs_spatial):
            base = in_starts[order[d]][0] + pads[a][0] - (taps[d] - 1)
            start = out_spans[d].start(self.pixels)[0]
            index.append(jnp.clip(start - base + out_counts[d], 0,
                                  padded.shape[d] - out_counts[d]))  # fmt: skip
        change_out = lax.dynamic_slice(padded, [*index, 0], [*out_counts, padded.shape[-1]])
        out_spec = dn.out_spec
        canonical = (out_spec[0], *out_spec[2:], out_spec[1])  # batch, spatial, feature
        change_out = jnp.transpose(change_out[None], [canonical.index(d)
                                                      for d in range(len(canonical))])  # fmt: skip
        out_axes = tuple(out_axes_of[a] for a in lhs.axes)
        spans = tuple(out_spans[lhs_spatial.index(a)] for a in lhs.axes)
        clean_out = self.slices(self.lookup(CacheKey(eqn.outputs[0])), out_axes,
                                [span.start(self.pixels) for span in spans],
                                [span.count for span in spans])  # fmt: skip
        data = clean_out + change_out[None].astype(clean_out.dtype)
        return [Window(data, out_axes, spans)]

    def _first_cover(self, window: Window) -> jax.Array:
        """[k, *window shape]: whether each window position is in no earlier window."""
        starts = self.starts(window)
        counts = [span.count for span in window.spans]
        shape = window.data.shape
        keep = jnp.ones(shape, bool)
        for j in range(1, self.k):
            covered = jnp.zeros(shape[1:], bool)
            for earlier in range(j):
                inside = None
                for i, axis in enumerate(window.axes):
                    position = starts[i][j] + jnp.arange(counts[i])
                    hit = (position >= starts[i][earlier]) & (
                        position < starts[i][earlier] + counts[i]
                    )
                    hit = hit.reshape([-1 if d == axis else 1 for d in range(len(shape) - 1)])
                    inside = hit if inside is None else inside & hit
                covered = covered | inside
            keep = keep.at[j].set(~covered)
        return keep

    def _reduce_window(self, eqn, values, pad_value=None, constant_args=()):
        """Pooling; `pad_value` and `constant_args` (the init value) for the generic
        `reduce_window`, whose reducer is one max, min or add."""
        operand = values[0]
        p = eqn.params
        if any(p["base_dilation"][a] != 1 for a in operand.axes):
            return None
        extents = {a: (d - 1) * p["window_dilation"][a] + 1
                   for a, d in enumerate(p["window_dimensions"])}  # fmt: skip
        strides = dict(enumerate(p["window_strides"]))
        pads = {a: tuple(pad) for a, pad in enumerate(p["padding"])}
        if any(min(pads[a]) < 0 for a in operand.axes):
            return None
        padding = tuple((0, 0) if a in operand.axes else pads[a] for a in range(len(pads)))
        dtype = self.program.avals[eqn.inputs[0]].dtype
        if pad_value is None:
            pad_value = _REDUCE_WINDOWS[eqn.primitive.name](dtype)

        def apply(regions, pointwise):
            del pointwise
            args, mapped = [regions, *constant_args], [True] + [False] * len(constant_args)
            out = self.per_window(eqn, args, mapped, padding=padding)
            return out[0] if eqn.primitive.multiple_results else out

        out_shape = self.program.avals[eqn.outputs[0]].shape
        identity = {a: a for a in range(len(pads))}
        return self._local(eqn, values, identity, extents, strides, pads, pad_value,
                           out_shape, apply)  # fmt: skip

    rule_reduce_window_sum = _reduce_window
    rule_reduce_window_max = _reduce_window
    rule_reduce_window_min = _reduce_window

    def rule_reduce_window(self, eqn, values):
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
        return self._reduce_window(eqn, [operand], pad_value, [init])

    def rule_reduce_sum(self, eqn, values):
        (window,) = values
        reduced = set(eqn.params["axes"])
        if not reduced & set(window.axes):  # a sum over other axes keeps the window
            out_axes = tuple(a - sum(r < a for r in reduced) for a in window.axes)
            axes = tuple(a + 1 for a in sorted(reduced))
            data = jnp.sum(window.data, axis=axes).astype(window.data.dtype)
            return [Window(data, out_axes, window.spans)]
        if not set(window.axes) <= reduced:
            return None
        # A global sum: the clean sum plus what the windows changed (each position once).
        ref = eqn.inputs[0]
        clean = self.lookup(CacheKey(ref))
        starts = self.starts(window)
        counts = [span.count for span in window.spans]
        clean_windows = self.slices(clean, window.axes, starts, counts)
        change = window.data - clean_windows  # [k, ...]
        if self.k > 1:  # a position inside an earlier window is counted there
            change = jnp.where(self._first_cover(window), change, 0)
        self.delta = True
        total = jnp.sum(change, axis=0)
        delta = jnp.sum(total, axis=tuple(sorted(reduced))).astype(window.data.dtype)
        return [Full(self.lookup(CacheKey(eqn.outputs[0])) + delta)]

    def _keeps_window(self, eqn, values, out_axes):
        """A primitive that acts along axes other than the window's, unchanged per window."""
        (window,) = values
        data = self.per_window(eqn, [window.data], [True])
        return [Window(data, out_axes, window.spans)]

    def rule_rev(self, eqn, values):
        (window,) = values
        if set(eqn.params["dimensions"]) & set(window.axes):
            return None
        return self._keeps_window(eqn, values, window.axes)

    def rule_transpose(self, eqn, values):
        (window,) = values
        permutation = list(eqn.params["permutation"])
        out_axes = tuple(permutation.index(a) for a in window.axes)
        return self._keeps_window(eqn, values, out_axes)

    def rule_squeeze(self, eqn, values):
        (window,) = values
        dims = set(eqn.params["dimensions"])
        if dims & set(window.axes):
            return None
        out_axes = tuple(a - sum(d < a for d in dims) for a in window.axes)
        return self._keeps_window(eqn, values, out_axes)

    def rule_broadcast_in_dim(self, eqn, values):
        (window,) = values
        p = eqn.params
        in_shape = self.program.avals[eqn.inputs[0]].shape
        out_axes = tuple(p["broadcast_dimensions"][a] for a in window.axes)
        if any(p["shape"][o] != in_shape[a] for a, o in zip(window.axes, out_axes, strict=True)):
            return None
        shape = list(p["shape"])
        for o, span in zip(out_axes, window.spans, strict=True):
            shape[o] = span.count
        data = self.per_window(eqn, [window.data], [True], shape=tuple(shape))
        return [Window(data, out_axes, window.spans)]

    def rule_dot_general(self, eqn, values):
        (contract_l, contract_r), (batch_l, batch_r) = eqn.params["dimension_numbers"]
        lhs, rhs = values
        if isinstance(lhs, Window) == isinstance(rhs, Window):
            return None
        window, contract, batch, side = (
            (lhs, contract_l, batch_l, 0)
            if isinstance(lhs, Window)
            else (rhs, contract_r, batch_r, 1)
        )
        if set(window.axes) & (set(contract) | set(batch)):
            return None
        lhs_rank = len(self.program.avals[eqn.inputs[0]].shape)
        rhs_rank = len(self.program.avals[eqn.inputs[1]].shape)
        free_l = [a for a in range(lhs_rank) if a not in contract_l and a not in batch_l]
        free_r = [a for a in range(rhs_rank) if a not in contract_r and a not in batch_r]
        base = len(batch_l) + (0 if side == 0 else len(free_l))
        free = free_l if side == 0 else free_r
        out_axes = tuple(base + free.index(a) for a in window.axes)
        args = [lhs.data, rhs] if side == 0 else [lhs, rhs.data]
        data = self.per_window(eqn, args, [side == 0, side == 1])
        return [Window(data, out_axes, window.spans)]

    def rule_concatenate(self, eqn, values):
        dimension = eqn.params["dimension"]
        windows = [v for v in values if isinstance(v, Window)]
        if dimension in windows[0].axes:
            return None
        return self.elementwise_like(eqn, values)

    def elementwise_like(self, eqn, values):
        """Primitives whose operands share the windowed axes: as elementwise."""
        return self.elementwise(eqn, values)

    def _shift(self, eqn, values, offsets, prepare):
        """Padding or cropping along the windowed axes: the window moves by `offsets`.

        The output window is the clean output around it with the operand's
        window (first passed through `prepare`, which acts on the other axes)
        written in.
        """
        window = values[0]
        out_shape = self.program.avals[eqn.outputs[0]].shape
        spans = tuple(
            span.shifted(offsets[a], out_shape[a])
            for a, span in zip(window.axes, window.spans, strict=True)
        )
        if not self.fits(spans):
            return None
        moved = Window(prepare(window.data), window.axes, window.spans)
        clean = self.lookup(CacheKey(eqn.outputs[0]))
        starts = [span.start(self.pixels) for span in spans]
        regions = self.slices(clean, window.axes, starts, [span.count for span in spans])
        data = self.paste(regions, starts, window.axes, moved, [offsets[a] for a in window.axes])
        return [Window(data, window.axes, spans)]

    def rule_pad(self, eqn, values):
        window, pad_value = values
        if isinstance(pad_value, Window):
            return None
        config = eqn.params["padding_config"]
        if any(config[a][0] < 0 or config[a][1] < 0 or config[a][2] != 0 for a in window.axes):
            return None
        others = [(0, 0, 0) if a in window.axes else tuple(c) for a, c in enumerate(config)]

        def prepare(data):
            return jax.vmap(lambda x: lax.pad(x, jnp.asarray(pad_value, x.dtype), others))(data)

        return self._shift(eqn, values, {a: config[a][0] for a in window.axes}, prepare)

    def rule_slice(self, eqn, values):
        (window,) = values
        p = eqn.params
        in_shape = self.program.avals[eqn.inputs[0]].shape
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
        return self._shift(eqn, values, offsets, prepare)


def _candidate_pixels(image, candidate, num_pixels: int, round_rgb: bool):
    """The rows and columns [k, 2] and the written colours [k, C] of one candidate.

    As `de.apply_candidate`: the colours are what the image holds at each
    position after the candidate is written (by one scatter, so that two
    pixels on one position resolve as they do there).
    """
    height, width = image.shape[0], image.shape[1]
    pixels = candidate.reshape(num_pixels, 5)
    rows = jnp.clip(jnp.floor(pixels[:, 0]), 0, height - 1).astype(jnp.int32)
    cols = jnp.clip(jnp.floor(pixels[:, 1]), 0, width - 1).astype(jnp.int32)
    rgb = jnp.clip(pixels[:, 2:], 0.0, 255.0)
    if round_rgb:
        rgb = jnp.round(rgb)
    same = (rows[:, None] == rows[None, :]) & (cols[:, None] == cols[None, :])
    first = jnp.argmax(same, axis=1)  # each position's first pixel stands for it
    written = image[rows, cols].at[first].set(rgb.astype(image.dtype))
    return jnp.stack([rows, cols], -1), written[first]


def _run(program: Program, params, lookup: Callable, image, candidate, round_rgb: bool,
         steps: list | None = None):  # fmt: skip
    """The incremental pass for one candidate; `lookup(CacheKey)` reads the cache.

    `steps`, when given, receives a `Step` for each input-dependent equation.
    """
    pixels, colours = _candidate_pixels(image, candidate, program.num_pixels, round_rgb)
    image_aval = program.avals[program.image_var]
    spans = (
        Span(image_aval.shape[1], 0, 0, 1, coordinate=0),
        Span(image_aval.shape[2], 0, 0, 1, coordinate=1),
    )
    colours = colours.astype(image_aval.dtype)
    incremental = _Pass(program, lookup, pixels)
    env = dict(program.constants)
    env.update(zip(program.param_vars, jax.tree.leaves(params), strict=True))
    if incremental.fits(spans):
        env[program.image_var] = Window(colours.reshape(program.num_pixels, 1, 1, 1, -1), (1, 2),
                                        spans)  # fmt: skip
    else:
        patched = jnp.asarray(image, image_aval.dtype).at[pixels[:, 0], pixels[:, 1]].set(colours)
        env[program.image_var] = Full(patched[None])
    for eqn in program.equations:
        values = [_read(env, ref) for ref in eqn.inputs]
        if any(isinstance(v, Window | Full) for v in values):
            outs = incremental.equation(eqn, values)
            if steps is not None:
                window = outs[0].spans if isinstance(outs[0], Window) else None
                mode = "window" if window else ("delta" if incremental.delta else "full")
                steps.append(Step(eqn.primitive.name, mode,
                                  tuple(program.avals[eqn.outputs[0]].shape),
                                  tuple(s.count for s in window) if window else None))  # fmt: skip
        else:
            outs = _bind(eqn, *values)
        env.update(zip(eqn.outputs, outs, strict=True))
    out = env[program.output_var]
    if isinstance(out, Window | Full):
        out = incremental.materialize(program.output_var, out)
    return out[0]


def candidate_logits(program: Program, params, activations, image, candidate, round_rgb=True):
    """Logits [C] of one candidate [k * 5] on one clean image [H, W, C] and its cache."""
    return _run(program, params, lambda key: activations[key.name], image, candidate, round_rgb)


@dataclasses.dataclass(frozen=True)
class Step:
    """How the incremental pass computes one input-dependent equation."""

    primitive: str
    mode: str  # 'window', 'delta' (the clean global sum or full map + the windows' change)
    # or 'full'
    shape: tuple[int, ...]  # the output map's shape
    window: tuple[int, ...] | None  # the window's length on each windowed axis


def _record(program: Program, param_structs) -> tuple[tuple[CacheKey, ...], tuple[Step, ...]]:
    """The clean maps the incremental pass reads and how it computes each equation,
    found by tracing it abstractly."""
    requested: dict[str, CacheKey] = {}
    steps: list[Step] = []

    def lookup(key: CacheKey):
        requested.setdefault(key.name, key)
        return jnp.zeros(key.shape(program), program.avals[key.var].dtype)

    image = jax.ShapeDtypeStruct(program.image_shape, jnp.float32)
    candidate = jax.ShapeDtypeStruct((program.num_pixels * 5,), jnp.float32)
    jax.eval_shape(functools.partial(_run, program, lookup=lookup, round_rgb=True, steps=steps),
                   param_structs, image=image, candidate=candidate)  # fmt: skip
    return tuple(requested.values()), tuple(steps)


# ---------------------------------------------------------------------------
# Evaluators: how the engine turns a generation's candidates into logits.


@dataclasses.dataclass(frozen=True)
class FullEvaluator:
    """Each candidate's perturbed image through the whole model (one flat batch)."""

    apply_fn: Callable

    name = "full"

    def activations(self, params, images) -> dict:
        del params, images
        return {}

    def empty_activations(self, num_slots: int) -> dict:
        del num_slots
        return {}

    def logits(self, params, activations, images, candidates, round_rgb: bool):
        """images [S, H, W, C], candidates [S, P, genes] -> logits [S, P, classes]."""
        del activations
        num_slots, popsize = candidates.shape[:2]
        perturbed = jax.vmap(
            jax.vmap(functools.partial(de.apply_candidate, round_rgb=round_rgb), (None, 0)),
            (0, 0),
        )(images, candidates)  # [S, P, H, W, C]
        flat = perturbed.reshape((num_slots * popsize, *perturbed.shape[2:]))
        logits = self.apply_fn(params, flat).astype(jnp.float32)
        return logits.reshape(num_slots, popsize, -1)


@dataclasses.dataclass(frozen=True)
class IncrementalEvaluator:
    """Each candidate through `Program`'s windows, from its image's activation cache."""

    program: Program

    name = "incremental"

    def activations(self, params, images) -> dict:
        """The activation caches of clean images [S, H, W, C] -> {name: [S, ...]}."""
        return jax.vmap(functools.partial(clean_activations, self.program), (None, 0))(
            params, images
        )

    def empty_activations(self, num_slots: int) -> dict:
        return {
            key.name: jnp.zeros((num_slots, *key.shape(self.program)),
                                self.program.avals[key.var].dtype)
            for key in self.program.cache_keys
        }  # fmt: skip

    def logits(self, params, activations, images, candidates, round_rgb: bool):
        """images [S, H, W, C], candidates [S, P, genes] -> logits [S, P, classes]."""
        one = functools.partial(candidate_logits, self.program, round_rgb=round_rgb)
        per_image = jax.vmap(one, (None, None, None, 0))  # over the population
        logits = jax.vmap(per_image, (None, 0, 0, 0))(params, activations, images, candidates)
        return logits.astype(jnp.float32)


def query_costs(model, num_pixels: int, program=None) -> dict[str, dict[str, float]]:
    """XLA's cost analysis of one candidate's evaluation, full and incremental:
    {evaluator: {"flops": ..., "bytes_accessed": ...}}.

    Counts the model on one perturbed image against the incremental pass on one
    candidate (its image's cache given); the clean pass, once per image, is left out.
    Lowered only, never compiled; `program` (of `program_for`) when already traced.
    """
    if program is None:
        program = program_for(model.apply_fn, model.params, model.image_shape, num_pixels)
    full = FullEvaluator(model.apply_fn)
    incremental = IncrementalEvaluator(program)
    images = jax.ShapeDtypeStruct((1, *model.image_shape), jnp.float32)
    candidates = jax.ShapeDtypeStruct((1, 1, 5 * num_pixels), jnp.float32)
    activations = jax.eval_shape(incremental.activations, model.params, images)
    out = {}
    for evaluator in (full, incremental):
        lowered = jax.jit(functools.partial(evaluator.logits, round_rgb=True)).lower(
            model.params, activations, images, candidates
        )
        analysis = lowered.cost_analysis()
        out[evaluator.name] = {
            "flops": float(analysis["flops"]),
            "bytes_accessed": float(analysis.get("bytes accessed", float("nan"))),
        }
    return out


def flops_per_query(model, num_pixels: int, program=None) -> dict[str, float]:
    """XLA's FLOPs of one candidate's evaluation, {evaluator: flops} (`query_costs`)."""
    costs = query_costs(model, num_pixels, program)
    return {name: cost["flops"] for name, cost in costs.items()}


# 'auto' takes the incremental evaluator when XLA counts at least this many times
# fewer FLOPs for it: below that, the gathers and the clean pass eat the gain.
AUTO_MIN_FLOP_RATIO = 1.2


def make_evaluator(kind: str, model, num_pixels: int):
    """The evaluator for `evaluator=kind` ('auto', 'full' or 'incremental')."""
    if kind not in EVALUATORS:
        raise InputError(f"evaluator={kind!r}: expected one of {EVALUATORS}")
    if kind == "full":
        return FullEvaluator(model.apply_fn)
    try:
        program = program_for(model.apply_fn, model.params, model.image_shape, num_pixels)
    except Exception as err:  # noqa: BLE001 - any model the tracer cannot read runs in full
        if kind == "incremental":
            raise InputError(
                f"evaluator=incremental: model {model.name} cannot be traced for one image "
                f"({type(err).__name__}: {err})"
            ) from err
        return FullEvaluator(model.apply_fn)
    if kind == "auto":
        flops = flops_per_query(model, num_pixels, program)  # lowered, not compiled
        if flops["full"] < AUTO_MIN_FLOP_RATIO * flops["incremental"]:
            return FullEvaluator(model.apply_fn)
    return IncrementalEvaluator(program)


def compare_records(full: list[dict], incremental: list[dict], prob_tolerance=1e-4) -> dict:
    """Per-attack agreement of two runs' records (results.jsonl), keyed by image and target.

    An attack agrees when success, adversarial label, applied pixels,
    generations and queries are equal and the probabilities within
    `prob_tolerance`. Differing attacks are listed with both records' figures.
    """
    by_key = {(r["image"], r["target_label"]): r for r in incremental}
    common = [r for r in full if (r["image"], r["target_label"]) in by_key]
    fields = ("success", "adv_label", "perturbation", "generations", "queries")
    differing, max_prob_diff = [], 0.0
    for a in common:
        b = by_key[(a["image"], a["target_label"])]
        prob_diff = float(np.max(np.abs(np.subtract(a["adv_probs"], b["adv_probs"]))))
        max_prob_diff = max(max_prob_diff, prob_diff)
        if any(a[f] != b[f] for f in fields) or prob_diff > prob_tolerance:
            differing.append({
                "image": a["image"], "target_label": a["target_label"],
                **{f"full_{f}": a[f] for f in fields}, **{f"incremental_{f}": b[f] for f in fields},
                "max_prob_diff": prob_diff,
            })  # fmt: skip
    return {
        "attacks": len(common),
        "same": len(common) - len(differing),
        "success_full": sum(r["success"] for r in common),
        "success_incremental": sum(
            by_key[(r["image"], r["target_label"])]["success"] for r in common
        ),  # fmt: skip
        "max_prob_diff": max_prob_diff,
        "differing": differing,
    }
