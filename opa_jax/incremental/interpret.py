"""The interpreters of a `Program`: the clean pass and the incremental pass.

The clean pass evaluates every equation on the clean image and keeps the maps
the incremental pass reads (the activation cache). The incremental pass,
written for one candidate, carries a `Window` or a `Full` value for every
input-dependent var: each equation with such an operand goes to its rule in
`rules.RULES`, or is computed in full when it has none. `trace` runs the
incremental pass abstractly once, to find the maps it reads and each
equation's form.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from opa_jax import de
from opa_jax.incremental import thresholds
from opa_jax.incremental.geometry import Context, Full, Span, Window
from opa_jax.incremental.program import (
    CacheKey,
    Equation,
    Program,
    Step,
    bind,
    read,
    trace_program,
)
from opa_jax.incremental.rules import RULES, Computed, full

# ---------------------------------------------------------------------------
# The clean pass.


def evaluate(program: Program, params, image) -> dict:
    """Every var's value for one image [H, W, C] (the full forward pass, kept)."""
    env = dict(program.constants)
    env.update(zip(program.param_vars, jax.tree.leaves(params), strict=True))
    env[program.image_var] = jnp.asarray(image, jnp.float32)[None]
    for eqn in program.equations:
        outs = bind(eqn, *[read(env, ref) for ref in eqn.inputs])
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
# The incremental pass.


def _candidate_pixels(image, candidate, num_pixels: int, round_rgb: bool):
    """The rows and columns [k, 2] and the written colours [k, C] of one candidate.

    As `de.apply_candidate`: the colours are what the image holds at each
    position after the candidate is written (by one scatter, so that two
    pixels on one position resolve as they do there).
    """
    height, width = image.shape[0], image.shape[1]
    pixels = candidate.reshape(num_pixels, -1)  # [k, 2 + C]
    rows = jnp.clip(jnp.floor(pixels[:, 0]), 0, height - 1).astype(jnp.int32)
    cols = jnp.clip(jnp.floor(pixels[:, 1]), 0, width - 1).astype(jnp.int32)
    rgb = jnp.clip(pixels[:, 2:], 0.0, 255.0)
    if round_rgb:
        rgb = jnp.round(rgb)
    same = (rows[:, None] == rows[None, :]) & (cols[:, None] == cols[None, :])
    first = jnp.argmax(same, axis=1)  # each position's first pixel stands for it
    written = image[rows, cols].at[first].set(rgb.astype(image.dtype))
    return jnp.stack([rows, cols], -1), written[first]


def compute(ctx: Context, eqn: Equation, values) -> Computed:
    """One equation with a windowed or full operand: its rule, else in full."""
    rule = RULES.get(eqn.primitive.name)
    if rule is not None and not any(isinstance(v, Full) for v in values):
        computed = rule(ctx, eqn, values)
        if computed is not None:
            return computed
    return full(ctx, eqn, values)


def _step(program: Program, eqn: Equation, computed: Computed) -> Step:
    out = computed.outputs[0]
    window = tuple(s.count for s in out.spans) if isinstance(out, Window) else None
    shape = tuple(program.avals[eqn.outputs[0]].shape)
    return Step(eqn.primitive.name, computed.form, shape, window)


def run(
    program: Program,
    params,
    lookup: Callable,
    image,
    candidate,
    round_rgb: bool,
    steps: list | None = None,
):
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
    ctx = Context(program, lookup, pixels)
    env = dict(program.constants)
    env.update(zip(program.param_vars, jax.tree.leaves(params), strict=True))
    if ctx.fits(spans):
        data = colours.reshape(program.num_pixels, 1, 1, 1, -1)
        env[program.image_var] = Window(data, (1, 2), spans)
    else:
        patched = jnp.asarray(image, image_aval.dtype).at[pixels[:, 0], pixels[:, 1]].set(colours)
        env[program.image_var] = Full(patched[None])
    for eqn in program.equations:
        values = [read(env, ref) for ref in eqn.inputs]
        if any(isinstance(v, Window | Full) for v in values):
            computed = compute(ctx, eqn, values)
            if steps is not None:
                steps.append(_step(program, eqn, computed))
            outs = computed.outputs
        else:
            outs = bind(eqn, *values)
        env.update(zip(eqn.outputs, outs, strict=True))
    out = env[program.output_var]
    if isinstance(out, Window | Full):
        out = ctx.materialize(program.output_var, out)
    return out[0]


def candidate_logits(program: Program, params, activations, image, candidate, round_rgb=True):
    """Logits of one candidate [k * (2 + C)] on one clean image [H, W, C] and its cache."""
    return run(program, params, lambda key: activations[key.name], image, candidate, round_rgb)


# ---------------------------------------------------------------------------
# Tracing: the program and what its incremental pass reads.


def _record(program: Program, param_structs) -> tuple[tuple[CacheKey, ...], tuple[Step, ...]]:
    """The clean maps the incremental pass reads and how it computes each equation,
    found by tracing it abstractly."""
    requested: dict[str, CacheKey] = {}
    steps: list[Step] = []

    def lookup(key: CacheKey):
        requested.setdefault(key.name, key)
        return jnp.zeros(key.shape(program), program.avals[key.var].dtype)

    image = jax.ShapeDtypeStruct(program.image_shape, jnp.float32)
    genes = program.num_pixels * de.pixel_genes(program.image_shape[-1])
    candidate = jax.ShapeDtypeStruct((genes,), jnp.float32)
    one = functools.partial(run, program, lookup=lookup, round_rgb=True, steps=steps)
    jax.eval_shape(one, param_structs, image=image, candidate=candidate)
    return tuple(requested.values()), tuple(steps)


def trace(
    apply_fn: Callable,
    params,
    image_shape,
    num_pixels: int,
    max_window_fraction: float = thresholds.DEFAULT_MAX_WINDOW_FRACTION,
    delta_convolutions: bool = True,
) -> Program:
    """The program of `apply_fn` for one image of `image_shape`, and its cache keys."""
    program = trace_program(
        apply_fn, params, image_shape, num_pixels, max_window_fraction, delta_convolutions
    )
    param_structs = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    cache_keys, steps = _record(program, param_structs)
    return dataclasses.replace(program, cache_keys=cache_keys, steps=steps)


def _params_signature(params):
    leaves, treedef = jax.tree.flatten(params)
    return treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)


_PROGRAMS: dict = {}


def program_for(apply_fn, params, image_shape, num_pixels: int, **options) -> Program:
    """`trace`, memoised on the model's function, parameter shapes and pixel count."""
    options_key = tuple(sorted(options.items()))
    key = (apply_fn, _params_signature(params), tuple(image_shape), num_pixels, options_key)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = trace(apply_fn, params, image_shape, num_pixels, **options)
    return _PROGRAMS[key]
