"""Window geometry: where the changed pixels' windows sit in each map.

Along each windowed axis a window follows one pixel coordinate p (row or
column). The positions it may change are
[ceil((p + low) / stride), floor((p + high) / stride)], with integers fixed at
trace time: a kernel of extent e, stride s and low padding l maps (low, high,
stride) to (low + stride (l - e + 1), high + stride l, stride s). The window
has the static length `count` (the most positions that interval can hold,
capped at the map size) and starts at the interval's first position, clamped
so the window stays inside the map.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from opa_jax.incremental.program import CacheKey, Program


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
        moved = self.stride * offset
        return dataclasses.replace(self, size=size, low=self.low + moved, high=self.high + moved)


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


def slices(array, axes, starts, counts) -> jax.Array:
    """Each window's slice of a map (one per window) -> [k, ...]."""

    def one(window_starts):
        index = [0] * array.ndim
        sizes = list(array.shape)
        for i, axis in enumerate(axes):
            index[axis] = window_starts[i]
            sizes[axis] = counts[i]
        return lax.dynamic_slice(array, index, sizes)

    return jax.vmap(one)(jnp.stack(starts, -1))


def _along(mask, axis: int, ndim: int):
    """A mask over one axis, shaped to broadcast against an array of `ndim` axes."""
    return mask.reshape([-1 if d == axis else 1 for d in range(ndim)])


@dataclasses.dataclass(frozen=True, eq=False)
class Context:
    """What a rule reads besides its equation: the program, one candidate's changed
    pixels, and the clean maps of its image (the activation cache)."""

    program: Program
    lookup: Callable  # CacheKey -> clean map
    pixels: jax.Array  # [k, 2] int32 row, column

    @property
    def k(self) -> int:
        return self.pixels.shape[0]

    def starts(self, window: Window) -> list[jax.Array]:
        return [span.start(self.pixels) for span in window.spans]

    def fits(self, spans) -> bool:
        """Whether windows of these spans are worth computing apart from the full map."""
        counts = math.prod(span.count for span in spans)
        sizes = math.prod(span.size for span in spans)
        if all(span.count == span.size for span in spans):
            return False
        return self.k * counts <= self.program.max_window_fraction * sizes

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
                    index = jnp.clip(position, 0, count - 1)
                    values = jnp.take(values, index, axis=axis, mode="clip")
                    inside = _along(inside, axis, region.ndim)
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
        regions = slices(clean, value.axes, starts, [span.count for span in spans])
        return self.paste(regions, starts, value.axes, value)

    def first_cover(self, window: Window) -> jax.Array:
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
                    hit = _along(hit, axis, len(shape) - 1)
                    inside = hit if inside is None else inside & hit
                covered = covered | inside
            keep = keep.at[j].set(~covered)
        return keep

    def change(self, var: int, window: Window, starts) -> jax.Array:
        """[k, *window shape]: each window (at `starts`, per axis [k]) minus the clean
        map of `var` there, each position counted in its first window only."""
        counts = [span.count for span in window.spans]
        clean = slices(self.lookup(CacheKey(var)), window.axes, starts, counts)
        change = window.data - clean
        if self.k > 1:  # a position inside an earlier window is counted there
            change = jnp.where(self.first_cover(window), change, 0)
        return change
