"""Evaluators: how the engine turns a generation's candidates into logits."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from opa_jax import de
from opa_jax.errors import InputError
from opa_jax.incremental import thresholds
from opa_jax.incremental.interpret import candidate_logits, clean_activations, program_for
from opa_jax.incremental.program import Program

EVALUATORS = ("auto", "full", "incremental")


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
        program = self.program
        return {
            key.name: jnp.zeros((num_slots, *key.shape(program)), program.avals[key.var].dtype)
            for key in program.cache_keys
        }

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
    genes = de.pixel_genes(model.image_shape[-1]) * num_pixels
    candidates = jax.ShapeDtypeStruct((1, 1, genes), jnp.float32)
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
        if flops["full"] < thresholds.AUTO_MIN_FLOP_RATIO * flops["incremental"]:
            return FullEvaluator(model.apply_fn)
    return IncrementalEvaluator(program)
