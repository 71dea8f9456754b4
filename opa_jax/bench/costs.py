"""Where the engine's time and memory go.

- `step_parts`: seconds per generation of the DE step and of building the
  perturbed images, without the model;
- `trivial_model`: the loop with a model that costs almost nothing;
- `breakdown`: the engine's wall time split into the model, idle slots, those
  parts, host work and the rest;
- `memory`: device bytes per in-flight image, from XLA's memory analysis.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from opa_jax import attack, de, devices, engine
from opa_jax.bench import measure
from opa_jax.models import LoadedModel


def _seconds_per_iteration(loop, *args, iterations: int, repetitions: int) -> float:
    """Median seconds per iteration of a jitted loop of `iterations` steps."""
    jax.block_until_ready(loop(*args))  # compile
    seconds = []
    for _ in range(repetitions):
        started = time.perf_counter()
        jax.block_until_ready(loop(*args))
        seconds.append((time.perf_counter() - started) / iterations)
    return float(np.median(seconds))


def step_parts(
    model,
    config: de.DEConfig,
    slots: int,
    workload: measure.Workload,
    iterations: int = 10,
    repetitions: int = 5,
) -> dict:
    """Seconds per generation of the engine's parts without the model, on its shapes.

    `de_step`: proposing candidates (mutation with its random numbers, and the
    initial population) and selection, as `engine._generation` calls them.
    `perturb`: writing the candidates' pixels into copies of the images, the
    model's input. Each runs `iterations` times in one jitted loop, as in the
    engine (buffers reused, no dispatch per generation).
    """
    image_shape = model.image_shape
    low, high = de.bounds(image_shape, config.num_pixels)
    key = jax.random.key(0)
    sample = workload.take(slots)
    images = jnp.asarray(sample.images, jnp.float32)  # [S, H, W, 3]
    labels = jnp.asarray(sample.true_labels)  # [S]
    indices, targets = jnp.arange(slots), jnp.full((slots,), -1)
    probs = jax.nn.softmax(
        jax.random.normal(key, (slots, config.popsize, model.num_classes)), axis=-1
    )  # [S, popsize, C]

    def propose(de_state, fresh):
        image_keys = jax.vmap(engine.image_key, in_axes=(None, 0, 0))(key, indices, targets)
        return jax.vmap(de.propose, in_axes=(0, 0, 0, None, None, None))(
            image_keys, de_state, fresh, config, low, high
        )  # [S, popsize, genes]

    def de_step(de_state, fresh):
        candidates = propose(de_state, fresh)
        return jax.vmap(de.update, in_axes=(0, 0, 0, 0, 0, 0, None, None))(
            de_state, fresh, candidates, probs, labels, targets, config, False
        )

    def perturb(candidates):
        apply = jax.vmap(
            jax.vmap(lambda image, c: de.apply_candidate(image, c, config.round_rgb), (None, 0)),
            (0, 0),
        )
        return apply(images, candidates).reshape((slots * config.popsize, *image_shape))

    @jax.jit
    def de_loop(de_state):  # the generation advances, so every step draws new numbers
        not_fresh = jnp.zeros((slots,), bool)
        return jax.lax.fori_loop(0, iterations, lambda _, s: de_step(s, not_fresh), de_state)

    @jax.jit
    def perturb_loop(candidates):
        def body(_, carry):
            candidates, _ = carry
            candidates = candidates.at[0, 0, 0].add(1.0)  # new input every step: nothing hoisted
            return candidates, perturb(candidates)

        out = jnp.zeros((slots * config.popsize, *image_shape), jnp.float32)
        return jax.lax.fori_loop(0, iterations, body, (candidates, out))[1]

    # Random populations and candidates within the bounds: the cost does not depend on them.
    rng = np.random.default_rng(0)
    within = lambda *shape: np.asarray(low + rng.random(shape) * (high - low), np.float32)
    state = engine.init_state(slots, image_shape, model.num_classes, config).de_state
    state = state.replace(
        population=within(slots, config.popsize, config.num_genes),
        fitness=np.asarray(rng.random((slots, config.popsize)), np.float32),
    )
    timing = dict(iterations=iterations, repetitions=repetitions)
    return {
        "de_step": _seconds_per_iteration(de_loop, state, **timing),
        "perturb": _seconds_per_iteration(
            perturb_loop, within(slots, config.popsize, config.num_genes), **timing
        ),
    }


def trivial_model(model: LoadedModel) -> LoadedModel:
    """A stand-in that reads every pixel but costs almost nothing: the loop without a model."""
    weights = jax.random.normal(jax.random.key(0), (3, model.num_classes)) * 0.01

    def apply_fn(params, images):  # [N, H, W, 3] -> [N, C]
        return jnp.mean(images, axis=(1, 2)) @ params

    return dataclasses.replace(
        model, name=model.name + "@trivial", apply_fn=apply_fn, params=weights
    )


def breakdown(engine_run: dict, ceiling_qps: float, parts: dict, trivial_run: dict) -> dict:
    """Splits the engine's wall time: 1 - efficiency = idle + de + perturb + host + other.

    The model at the ceiling would need `evaluations / ceiling` seconds; the
    part of that spent on idle slots is lost, and so is all the wall time
    beyond it. `other` is what the measured parts do not explain: the loop's
    bookkeeping, and the in-loop model running faster or slower than alone
    (on a shared machine, mostly noise). `accounted_efficiency` instead adds
    the measured cost of the loop without a model (a trivial model, host work
    included) to the model's time at the ceiling: it is not subject to the
    noise of comparing two long runs.
    """
    wall = engine_run["seconds"]
    iterations = max(engine_run["iterations"], 1)
    model_seconds = engine_run["evaluations"] / ceiling_qps
    model_share = model_seconds / wall
    active = engine_run["active_evaluations"] / max(engine_run["evaluations"], 1.0)
    idle = model_share * (1.0 - active)
    de_share = iterations * parts["de_step"] / wall
    perturb_share = iterations * parts["perturb"] / wall
    host_share = engine_run["host_seconds"] / wall
    loop_seconds = trivial_run["seconds"] / max(trivial_run["iterations"], 1)  # per generation
    return {
        "efficiency": model_share - idle,
        "accounted_efficiency": active
        * model_seconds
        / (model_seconds + iterations * loop_seconds),
        "idle_slots": idle,
        "de_step": de_share,
        "perturb": perturb_share,
        "host": host_share,
        "other": 1.0 - model_share - de_share - perturb_share - host_share,
        "idle_share_of_evaluations": 1.0 - active,
        "seconds_per_generation": {
            "engine": wall / iterations,
            "model_at_ceiling": model_seconds / iterations,
            "de_step": parts["de_step"],
            "perturb": parts["perturb"],
            "loop_with_trivial_model": loop_seconds,
            "host_per_device_call": engine_run["host_seconds"] / max(engine_run["device_calls"], 1),
        },
    }


# ---------------------------------------------------------------------------
# Memory.


def loop_memory(model, config: de.DEConfig, slots: int, chunk: int) -> dict:
    """Bytes of the compiled device loop (XLA's memory analysis): arguments, temporaries, output.

    The arguments are placed as `Attacker.run` places them, so the lowering is
    the one a run compiles (and is found in the compilation cache after one).
    """
    attacker = attack.Attacker(model, config, False, slots, jax.local_devices()[:1])  # per device
    analysis = attacker.lower(chunk).compile().memory_analysis()
    if analysis is None:
        return {}
    return {
        "argument_bytes": int(analysis.argument_size_in_bytes),
        "temp_bytes": int(analysis.temp_size_in_bytes),
        "output_bytes": int(analysis.output_size_in_bytes),
        "alias_bytes": int(analysis.alias_size_in_bytes),
    }


def memory(model, config: de.DEConfig, slot_counts, chunk: int, measured_peak=None) -> dict:
    """Device memory per in-flight image, from the compiled loop at several slot counts.

    `per_slot` is (temporaries + arguments) / slots at each count; `marginal`
    is the growth per extra slot between the smallest and largest count,
    which leaves out the fixed cost (parameters, code). `auto_slots_estimate`
    is `devices.slot_bytes`, what `devices.auto_slots` assumes on accelerators.
    """
    rows = []
    for slots in slot_counts:
        row = {"slots": slots, **loop_memory(model, config, slots, chunk)}
        if "temp_bytes" in row:
            row["per_slot_bytes"] = (row["temp_bytes"] + row["argument_bytes"]) / slots
        rows.append(row)
    out = {"loop": rows}
    if len(rows) >= 2 and "temp_bytes" in rows[0]:
        first, last = rows[0], rows[-1]
        total = lambda r: r["temp_bytes"] + r["argument_bytes"]
        out["marginal_bytes_per_slot"] = (total(last) - total(first)) / (
            last["slots"] - first["slots"]
        )
    out["forward_temp_bytes_per_popsize_batch"] = devices.forward_temp_bytes(model, config.popsize)
    out["auto_slots_estimate_bytes_per_slot"] = devices.slot_bytes(model, config.popsize)
    if measured_peak is not None:
        out["device_peak_bytes"] = measured_peak
    return out


def device_peak_bytes():
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - optional per backend
        stats = None
    return None if not stats else stats.get("peak_bytes_in_use")
