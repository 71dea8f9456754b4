"""The attack loop on the device: fixed in-flight slots refilled without a host round trip.

Each loop iteration is one generation for every slot: the slots' candidates
(a fresh slot's initial population, otherwise its trial vectors) go through
the model as one flat batch of `slots * popsize` images, then selection runs.
A slot whose image stops records its result in an output buffer and takes the
next waiting image from the queue at the start of the next iteration, so the
model spends nearly every evaluation on unfinished images.

The model is called through an evaluator (`opa_jax.incremental`): the full
forward pass of every perturbed image, or the incremental pass, which reads
the activation cache that the clean pass fills when an image enters its slot.

Each image's random stream is `image_key(key, dataset_index, target)`, so its
result does not depend on the slot count, the batch or the device count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from opa_jax import de, incremental
from opa_jax.search import Search


@struct.dataclass
class Queue:
    """A chunk of work items, padded to a fixed length; `length` are valid."""

    images: jax.Array  # [Q, H, W, C] uint8
    true_labels: jax.Array  # [Q] int32
    target_labels: jax.Array  # [Q] int32, -1 when non-targeted
    indices: jax.Array  # [Q] int32 dataset index
    work_ids: jax.Array  # [Q] int32 caller's id for the item
    length: jax.Array  # [] int32


@struct.dataclass
class EngineState:
    """Everything in flight between loop calls."""

    images: jax.Array  # [S, H, W, C] the slot's clean image, float32
    true_labels: jax.Array  # [S]
    target_labels: jax.Array  # [S]
    indices: jax.Array  # [S]
    work_ids: jax.Array  # [S], -1 when the slot is idle
    fresh: jax.Array  # [S] bool: evaluate the initial population next
    activations: dict  # {name: [S, ...]} the slots' clean maps (incremental evaluator), or {}
    de_state: Any  # the search rule's image state (e.g. de.ImageState), batched over [S]
    # Counters, one per device ([1] inside a device's loop) so they shard with the slots.
    evaluations: jax.Array  # [D] float32, model evaluations spent (all slots)
    active_evaluations: jax.Array  # [D] float32, of those on unfinished images
    iterations: jax.Array  # [D] int32, loop iterations (generations)
    nan_seen: jax.Array  # [D] bool: the model returned a non-finite output


@struct.dataclass
class Finished:
    """Results of images that finished during one loop call, `count` valid rows."""

    work_ids: jax.Array  # [R]
    success: jax.Array  # [R] bool
    candidate: jax.Array  # [R, genes]
    probs: jax.Array  # [R, C] model output on the best perturbed image
    generations: jax.Array  # [R]
    queries: jax.Array  # [R]
    outputs: dict  # {name: [R, ...]} the search rule's extra outputs (`Search.outputs`)
    count: jax.Array  # []


def image_key(key, index, target):
    """The random stream of one work item: its dataset index and target (-1: none)."""
    return jax.random.fold_in(jax.random.fold_in(key, index), target + 1)


def init_state(
    num_slots: int,
    image_shape,
    num_classes: int,
    config: Search,
    num_devices: int = 1,
    evaluator=None,
) -> EngineState:
    empty = config.empty_state(num_classes, image_shape)
    activations = evaluator.empty_activations(num_slots) if evaluator is not None else {}
    return EngineState(
        images=jnp.zeros((num_slots, *image_shape), jnp.float32),
        true_labels=jnp.zeros((num_slots,), jnp.int32),
        target_labels=jnp.full((num_slots,), -1, jnp.int32),
        indices=jnp.zeros((num_slots,), jnp.int32),
        work_ids=jnp.full((num_slots,), -1, jnp.int32),
        fresh=jnp.zeros((num_slots,), bool),
        activations=activations,
        de_state=jax.tree.map(lambda x: jnp.broadcast_to(x, (num_slots, *x.shape)), empty),
        evaluations=jnp.zeros((num_devices,), jnp.float32),
        active_evaluations=jnp.zeros((num_devices,), jnp.float32),
        iterations=jnp.zeros((num_devices,), jnp.int32),
        nan_seen=jnp.zeros((num_devices,), bool),
    )


def empty_queue(length: int, image_shape) -> Queue:
    return Queue(
        images=np.zeros((length, *image_shape), np.uint8),
        true_labels=np.zeros((length,), np.int32),
        target_labels=np.full((length,), -1, np.int32),
        indices=np.zeros((length,), np.int32),
        work_ids=np.full((length,), -1, np.int32),
        length=np.zeros((), np.int32),
    )


def _refill(state: EngineState, queue: Queue, cursor):
    """Moves the next waiting items into idle slots; returns the state and new cursor."""
    idle = state.work_ids < 0
    rank = jnp.cumsum(idle) - 1  # the k-th idle slot takes item cursor + k
    take = idle & (cursor + rank < queue.length)
    source = jnp.clip(cursor + rank, 0, queue.images.shape[0] - 1)

    def pick(slot_value, queue_values):
        new = queue_values[source]
        mask = take.reshape(take.shape + (1,) * (new.ndim - 1))
        return jnp.where(mask, new.astype(slot_value.dtype), slot_value)

    state = state.replace(
        images=pick(state.images, queue.images),
        true_labels=pick(state.true_labels, queue.true_labels),
        target_labels=pick(state.target_labels, queue.target_labels),
        indices=pick(state.indices, queue.indices),
        work_ids=pick(state.work_ids, queue.work_ids),
        fresh=state.fresh | take,
    )
    return state, cursor + jnp.sum(take)


def _select_rows(mask, new, old):
    """Leaf by leaf, the rows of `new` where `mask` [S] is set and of `old` elsewhere."""
    pick = lambda n, o: jnp.where(mask.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)
    return jax.tree.map(pick, new, old)


def _generation(state: EngineState, key, evaluator, params, config, targeted, low, high):
    """One generation for every slot: propose, one evaluation of all candidates, update."""
    num_slots = state.work_ids.shape[0]
    active = state.work_ids >= 0
    image_keys = jax.vmap(image_key, in_axes=(None, 0, 0))(key, state.indices, state.target_labels)
    candidates = jax.vmap(config.propose, in_axes=(0, 0, 0, None, None))(
        image_keys, state.de_state, state.fresh, low, high
    )  # [S, popsize, genes]
    activations = state.activations
    if activations:  # the clean pass, for the slots that took a new image
        clean_pass = lambda: evaluator.activations(params, state.images)
        activations = jax.lax.cond(
            jnp.any(state.fresh),
            lambda: _select_rows(state.fresh, clean_pass(), activations),
            lambda: activations,
        )
    logits = evaluator.logits(
        params, activations, state.images, candidates, config.round_rgb
    )  # [S, popsize, C]
    # Checked on the logits, not the probabilities: XLA may simplify a softmax of a
    # constant NaN row to a uniform one, so only the model's own output is a sure sign.
    nan_seen = state.nan_seen | jnp.any(active[:, None, None] & ~jnp.isfinite(logits))
    probs = jax.nn.softmax(logits, axis=-1)  # [S, popsize, C]
    new_de = jax.vmap(config.update, in_axes=(0, 0, 0, 0, 0, 0, None))(
        state.de_state,
        state.fresh,
        candidates,
        probs,
        state.true_labels,
        state.target_labels,
        targeted,
    )
    # Idle slots keep their (meaningless) state and never finish.
    new_de = _select_rows(active, new_de, state.de_state)
    evaluations = float(num_slots * config.popsize)
    active_evaluations = jnp.sum(active).astype(jnp.float32) * config.popsize
    return state.replace(
        de_state=new_de,
        activations=activations,
        fresh=jnp.zeros_like(state.fresh),
        evaluations=state.evaluations + evaluations,
        active_evaluations=state.active_evaluations + active_evaluations,
        iterations=state.iterations + 1,
        nan_seen=nan_seen,
    )


def _collect(state: EngineState, finished: Finished, config: Search):
    """Moves stopped slots' results to the output buffer and frees those slots."""
    done = (state.work_ids >= 0) & state.de_state.stopped
    capacity = finished.work_ids.shape[0]
    position = jnp.where(done, finished.count + jnp.cumsum(done) - 1, capacity)  # drop if not done
    s = state.de_state

    def put(buffer, values):
        return buffer.at[position].set(values.astype(buffer.dtype), mode="drop")

    finished = Finished(
        work_ids=put(finished.work_ids, state.work_ids),
        success=put(finished.success, s.best_is_adv),
        candidate=put(finished.candidate, s.best_candidate),
        probs=put(finished.probs, s.best_probs),
        generations=put(finished.generations, s.generation),
        queries=put(finished.queries, s.queries),
        outputs=jax.tree.map(put, finished.outputs, config.outputs(s)),
        count=finished.count + jnp.sum(done),
    )
    state = state.replace(
        work_ids=jnp.where(done, -1, state.work_ids),
        de_state=s.replace(stopped=s.stopped & ~done),
    )
    return state, finished


def run_queue(
    key,
    state: EngineState,
    queue: Queue,
    final,
    params,
    max_iterations,
    *,
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    config: Search,
    targeted: bool,
    evaluator=None,
) -> tuple[EngineState, Finished, jax.Array]:
    """Runs generations until the queue is drained (and, when `final`, every slot is done).

    Not final: returns as soon as an idle slot could not be refilled, leaving
    the rest in flight for the next call with the next chunk. It also returns
    after `max_iterations` generations, so the host can write results on time;
    the third output says how many queue items were taken. Jit this with
    `apply_fn`, `config`, `targeted` and `evaluator` static; `evaluator`
    (default: the full forward pass of `apply_fn`) must match the one `state`
    was made with.
    """
    if evaluator is None:
        evaluator = incremental.FullEvaluator(apply_fn)
    num_slots = state.work_ids.shape[0]
    capacity = num_slots + queue.images.shape[0]
    low, high = de.bounds(queue.images.shape[1:], config.num_pixels)
    finished = Finished(
        work_ids=jnp.full((capacity,), -1, jnp.int32),
        success=jnp.zeros((capacity,), bool),
        candidate=jnp.zeros((capacity, config.num_genes), jnp.float32),
        probs=jnp.zeros((capacity, state.de_state.best_probs.shape[-1]), jnp.float32),
        generations=jnp.zeros((capacity,), jnp.int32),
        queries=jnp.zeros((capacity,), jnp.int32),
        outputs=jax.tree.map(
            lambda x: jnp.zeros((capacity, *x.shape[1:]), x.dtype), config.outputs(state.de_state)
        ),
        count=jnp.zeros((), jnp.int32),
    )

    def cond(carry):
        state, cursor, _, iteration = carry
        remaining = queue.length - cursor
        idle = jnp.sum(state.work_ids < 0)
        work_left = (idle < num_slots) | (remaining > 0)
        # Not final: stop once the queue is consumed and a slot has nothing to do.
        keep_going = final | (remaining > 0) | (idle == 0)
        in_time = iteration < max_iterations
        return work_left & keep_going & in_time & ~jnp.any(state.nan_seen)

    def body(carry):
        state, cursor, finished, iteration = carry
        state, cursor = _refill(state, queue, cursor)
        state = _generation(state, key, evaluator, params, config, targeted, low, high)
        state, finished = _collect(state, finished, config)
        return state, cursor, finished, iteration + 1

    zero = jnp.zeros((), jnp.int32)
    state, cursor, finished, _ = jax.lax.while_loop(cond, body, (state, zero, finished, zero))
    return state, finished, cursor
