"""Evaluate pixel candidates by recomputing only what the changed pixels reach.

A candidate differs from its clean image in k pixels. A convolution changes
only a window around each changed pixel, and the window grows layer by layer,
so most of a full forward pass recomputes values the pixels cannot have
changed. This package is a transformation of any model's computation, read
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

Modules: `program` (tracing `apply_fn` into a `Program`), `geometry` (where
the windows sit: `Span`, `Window`, `Full`), `rules` (the rule table,
`RULES`), `interpret` (the clean and incremental passes, `trace`),
`evaluators` (`FullEvaluator`, `IncrementalEvaluator`, `make_evaluator`) and
`thresholds` (the measured, platform-dependent trade-offs).

Adding a primitive is one decorated rule in `rules.py` and one row in
tests/test_incremental_rules.py. A max over channels, for example, acts along
axes the window does not cover, so it joins the `keeps_window` family:

    @keeps_window("reduce_max")
    def _reduce_max(ctx, eqn, window):
        reduced = set(eqn.params["axes"])
        if reduced & set(window.axes):
            return None  # a max over a windowed axis: computed in full
        return tuple(a - sum(r < a for r in reduced) for a in window.axes)

and its row in `ROWS` checks the windowed result against the full computation
and the form the rule took (`W` is `Form.WINDOW`):

    Row("reduce_max", lambda x: jnp.max(x, axis=-1, keepdims=True), W),

A rule outside the families is `@register("name")` on
`rule(ctx, eqn, values) -> Computed | None` (see `rules`).
"""

from opa_jax.incremental.evaluators import (
    EVALUATORS,
    FullEvaluator,
    IncrementalEvaluator,
    flops_per_query,
    make_evaluator,
    query_costs,
)
from opa_jax.incremental.geometry import Context, Full, Span, Window
from opa_jax.incremental.interpret import (
    cache_bytes,
    candidate_logits,
    clean_activations,
    evaluate,
    program_for,
    trace,
)
from opa_jax.incremental.program import CacheKey, Equation, Form, Literal, Program, Step
from opa_jax.incremental.rules import RULES, Computed, keeps_window, register
from opa_jax.incremental.thresholds import (
    AUTO_MIN_FLOP_RATIO,
    DEFAULT_MAX_WINDOW_FRACTION,
    DELTA_FULL_MAX_INPUT_SHARE,
    DELTA_FULL_MAX_INPUT_SHARE_ONE_WINDOW,
    DELTA_MAX_INPUT_SHARE,
)

__all__ = [
    "AUTO_MIN_FLOP_RATIO",
    "DEFAULT_MAX_WINDOW_FRACTION",
    "DELTA_FULL_MAX_INPUT_SHARE",
    "DELTA_FULL_MAX_INPUT_SHARE_ONE_WINDOW",
    "DELTA_MAX_INPUT_SHARE",
    "EVALUATORS",
    "RULES",
    "CacheKey",
    "Computed",
    "Context",
    "Equation",
    "Form",
    "Full",
    "FullEvaluator",
    "IncrementalEvaluator",
    "Literal",
    "Program",
    "Span",
    "Step",
    "Window",
    "cache_bytes",
    "candidate_logits",
    "clean_activations",
    "evaluate",
    "flops_per_query",
    "keeps_window",
    "make_evaluator",
    "program_for",
    "query_costs",
    "register",
    "trace",
]
