"""A model's computation as data: `apply_fn` traced for one image into a `Program`.

The jaxpr of `apply_fn(params, images)` for one image, with its calls (`jit`,
`custom_jvp_call`, `remat`, ...) inlined into one flat list of equations, and
the set of vars that depend on the image. `interpret.trace` completes it with
the clean maps the incremental pass reads (`CacheKey`) and how it computes
each equation (`Step`).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from opa_jax.errors import InputError

try:  # jax >= 0.4.30
    from jax.extend import core as jax_core
except ImportError:  # pragma: no cover
    from jax import core as jax_core

# Primitives whose sub-computation is inlined: (name, parameter holding the jaxpr).
CALLS = {
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


class Form(enum.StrEnum):
    """How a rule computed an equation's outputs for one candidate."""

    WINDOW = "window"  # on windows of static size around the changed pixels
    WINDOW_DELTA = "window_delta"  # windows: their clean values + the change's effect
    FULL_DELTA = "full_delta"  # the full clean output + the windows' change's effect
    FULL = "full"  # the full computation on the patched maps


@dataclasses.dataclass(frozen=True)
class Step:
    """How the incremental pass computes one input-dependent equation."""

    primitive: str
    form: Form
    shape: tuple[int, ...]  # the output map's shape
    window: tuple[int, ...] | None  # the window's length on each windowed axis

    @property
    def mode(self) -> str:
        """What the output is: 'window', 'delta' (the full clean output + the windows'
        change) or 'full'."""
        if self.window is not None:
            return "window"
        return "delta" if self.form == Form.FULL_DELTA else "full"


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
    cache_keys: tuple[CacheKey, ...] = ()  # the clean maps the incremental pass reads
    steps: tuple[Step, ...] = ()  # how each input-dependent equation is computed

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.avals[self.image_var].shape[1:])


def read(env: dict, ref):
    """An operand's value: a literal's constant, else the var's entry in `env`."""
    return ref.value if isinstance(ref, Literal) else env[ref]


def bind(eqn: Equation, *values) -> list:
    """The equation's primitive on `values`; always a list of outputs."""
    out = eqn.primitive.bind(*values, **eqn.params)
    return out if eqn.primitive.multiple_results else [out]


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

        def read_atom(atom):
            if isinstance(atom, jax_core.Literal):
                return Literal(atom.val)
            return names[atom]

        for eqn in jaxpr.eqns:
            ins = [read_atom(atom) for atom in eqn.invars]
            key = CALLS.get(eqn.primitive.name)
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
        return [read_atom(atom) for atom in jaxpr.outvars]

    inputs = [new_var(var.aval) for var in closed.jaxpr.invars]
    outputs = inline(closed.jaxpr, closed.consts, inputs)
    return equations, avals, constants, inputs, outputs


def trace_program(
    apply_fn: Callable,
    params,
    image_shape,
    num_pixels: int,
    max_window_fraction: float,
    delta_convolutions: bool = True,
) -> Program:
    """The program of `apply_fn` for one image of `image_shape`, without its cache keys
    and steps (`interpret.trace` adds them)."""
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
    return Program(
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
