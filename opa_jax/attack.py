"""Host side of an attack: streams work items through the device loop in chunks.

Only one chunk of images is on the device at a time, so memory stays flat in
the number of images; finished results come back after every chunk.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from opa_jax import de, engine, incremental
from opa_jax.errors import InputError
from opa_jax.search import Search


@dataclasses.dataclass
class WorkItems:
    """What to attack: one row per (image, target) pair."""

    positions: np.ndarray  # [N] position in the dataset, passed to read_images
    indices: np.ndarray  # [N] dataset index (keys the random stream)
    true_labels: np.ndarray  # [N]
    target_labels: np.ndarray  # [N], -1 when non-targeted

    def __len__(self):
        return len(self.positions)

    def select(self, rows) -> WorkItems:
        """The items at `rows` (an index array, boolean mask or slice)."""
        return WorkItems(
            self.positions[rows],
            self.indices[rows],
            self.true_labels[rows],
            self.target_labels[rows],
        )


@dataclasses.dataclass
class Results:
    """Per-item results of a finished chunk, rows in finishing order."""

    work_ids: np.ndarray  # [R] row in the WorkItems
    success: np.ndarray  # [R] bool
    perturbation: np.ndarray  # [R, num_pixels, 5] as applied: integer x, y; clipped colour
    adv_probs: np.ndarray  # [R, C]
    generations: np.ndarray  # [R]
    queries: np.ndarray  # [R]
    outputs: dict = dataclasses.field(default_factory=dict)  # the search rule's, {name: [R, ...]}

    @property
    def adv_label(self):
        return self.adv_probs.argmax(-1)

    @property
    def adv_prob(self):
        return self.adv_probs.max(-1)

    @classmethod
    def concatenate(cls, chunks: Sequence[Results]) -> Results:
        """The rows of several chunks as one, in the chunks' order."""
        join = lambda *rows: np.concatenate(rows)
        fields = [
            jax.tree.map(join, *[getattr(c, f.name) for c in chunks])
            for f in dataclasses.fields(cls)
        ]
        return cls(*fields)

    def select(self, rows) -> Results:
        """The rows `rows` (an index array or mask) of every field."""
        take = lambda x: x[rows]
        fields = [jax.tree.map(take, getattr(self, f.name)) for f in dataclasses.fields(self)]
        return type(self)(*fields)

    def sorted_by_work_id(self) -> Results:
        return self.select(np.argsort(self.work_ids))


@dataclasses.dataclass
class LoopCounters:
    """What `Attacker.run` has spent so far, updated after every device call."""

    evaluations: float = 0.0  # model evaluations spent by the loop
    active_evaluations: float = 0.0  # of those, on unfinished images
    iterations: int = 0  # loop iterations (generations)
    device_calls: int = 0
    device_seconds: float = 0.0  # wall time of the device calls, until their outputs were ready


class Attacker:
    """Holds the compiled loop for one model and DE config; `run` streams items through it.

    The in-flight slots and each chunk of the queue are sharded over a `Mesh`
    of the local devices along a `data` axis: every device runs its own loop
    on its share (no collectives), and parameters are replicated. An image's
    result depends only on its key, so it is the same for any device count.

    `evaluator` is 'full', 'incremental', 'auto' (`incremental.make_evaluator`)
    or an evaluator object; it never changes results beyond float rounding.
    """

    def __init__(
        self,
        model,
        config: Search,
        targeted: bool,
        num_slots: int,
        devices=None,
        evaluator="full",
    ):
        if num_slots < 1:
            raise InputError(f"slots={num_slots}: expected >= 1")
        self.model = model
        self.config = config
        self.targeted = targeted
        self.devices = list(devices or jax.local_devices())
        self.num_slots = num_slots  # per device
        self.mesh = Mesh(np.asarray(self.devices), ("data",))
        if isinstance(evaluator, str):
            evaluator = incremental.make_evaluator(evaluator, model, config.num_pixels)
        self.evaluator = evaluator
        self._run_queue = _compiled_loop(model.apply_fn, config, targeted, self.mesh, evaluator)
        self._params = jax.device_put(model.params, NamedSharding(self.mesh, P()))

    def run(
        self,
        key,
        items: WorkItems,
        read_images: Callable[[Sequence[int]], np.ndarray],
        chunk_size: int,
        counters: LoopCounters | None = None,
        call_seconds: float = 30.0,
    ) -> Iterator[Results]:
        """Yields results as the device returns them, at least every `call_seconds`.

        Item i goes to device i mod D; each call takes up to `chunk_size` items
        per device, and ends after a number of generations sized from the
        previous calls to last about `call_seconds`. Items a call did not take
        go into the next one.
        """
        image_shape = tuple(self.model.image_shape)
        num_devices = len(self.devices)
        sharding = NamedSharding(self.mesh, P("data"))
        state = self._initial_state()
        pending = [np.arange(d, len(items), num_devices) for d in range(num_devices)]
        cursor = np.zeros(num_devices, np.int64)
        max_iterations = 1  # the first call times one generation; later calls are sized from it
        while True:
            queue = engine.empty_queue(chunk_size * num_devices, image_shape)
            lengths = np.zeros((num_devices,), np.int32)
            rows_per_device = [p[c : c + chunk_size] for p, c in zip(pending, cursor, strict=True)]
            all_rows = np.concatenate(rows_per_device)
            images = read_images(items.positions[all_rows]) if len(all_rows) else queue.images
            if images.shape[1:] != image_shape:
                raise InputError(
                    f"images have shape {images.shape[1:]}, but model {self.model.name} "
                    f"expects {image_shape}"
                )
            offset = 0
            for d, rows in enumerate(rows_per_device):
                at = slice(d * chunk_size, d * chunk_size + len(rows))
                queue.images[at] = images[offset : offset + len(rows)]
                queue.true_labels[at] = items.true_labels[rows]
                queue.target_labels[at] = items.target_labels[rows]
                queue.indices[at] = items.indices[rows]
                queue.work_ids[at] = rows
                lengths[d] = len(rows)
                offset += len(rows)
            final = all(c + chunk_size >= len(p) for p, c in zip(pending, cursor, strict=True))
            queue = jax.device_put(queue.replace(length=lengths), sharding)
            started = time.perf_counter()
            iterations_before = int(np.max(jax.device_get(state.iterations)))
            state, finished, taken = jax.block_until_ready(
                self._run_queue(
                    key, state, queue, np.asarray(final), self._params, np.int32(max_iterations)
                )
            )
            device_seconds = time.perf_counter() - started
            state_counters = (
                state.evaluations,
                state.active_evaluations,
                state.iterations,
                state.nan_seen,
                state.work_ids,
            )
            finished, taken, device_counters = jax.device_get((finished, taken, state_counters))
            elapsed = time.perf_counter() - started
            evaluations, active_evaluations, iterations, nan_seen, work_ids = device_counters
            if np.any(nan_seen):
                raise InputError(
                    f"model {self.model.name} returned NaN or infinite outputs during the attack; "
                    "check the weights and the input normalisation"
                )
            cursor += taken
            ran = int(np.max(iterations)) - iterations_before
            if ran >= max_iterations and elapsed > 0:  # the cap ended the call: resize it
                per_iteration = elapsed / ran
                max_iterations = int(np.clip(0.8 * call_seconds / per_iteration, 1, 1 << 20))
            if counters is not None:
                counters.evaluations = float(np.sum(evaluations))
                counters.active_evaluations = float(np.sum(active_evaluations))
                counters.iterations = int(np.max(iterations))
                counters.device_calls += 1
                counters.device_seconds += device_seconds
            capacity = finished.work_ids.shape[0] // num_devices
            rows = np.concatenate(
                [np.arange(d * capacity, d * capacity + c) for d, c in enumerate(finished.count)]
            )
            yield Results(
                work_ids=finished.work_ids[rows],
                success=finished.success[rows],
                perturbation=de.applied_pixels(
                    finished.candidate[rows], image_shape, self.config.round_rgb
                ),
                adv_probs=finished.probs[rows],
                generations=finished.generations[rows],
                queries=finished.queries[rows],
                outputs=jax.tree.map(operator.itemgetter(rows), finished.outputs),
            )
            drained = all(c >= len(p) for p, c in zip(pending, cursor, strict=True))
            if drained and np.all(work_ids < 0):
                return

    def _initial_state(self) -> engine.EngineState:
        """Idle slots on every device, placed as `run` and `lower` place them."""
        num_devices = len(self.devices)
        state = engine.init_state(
            self.num_slots * num_devices,
            tuple(self.model.image_shape),
            self.model.num_classes,
            self.config,
            num_devices,
            self.evaluator,
        )
        return jax.device_put(state, NamedSharding(self.mesh, P("data")))

    def lower(self, chunk_size: int) -> jax.stages.Lowered:
        """The device loop lowered for `chunk_size` queue items per device, with its
        arguments placed as `run` places them (for XLA's memory analysis)."""
        num_devices = len(self.devices)
        queue = engine.empty_queue(chunk_size * num_devices, tuple(self.model.image_shape))
        queue = queue.replace(length=np.zeros((num_devices,), np.int32))
        return self._run_queue.lower(
            jax.random.key(0),
            self._initial_state(),
            jax.device_put(queue, NamedSharding(self.mesh, P("data"))),
            np.asarray(True),
            self._params,
            np.int32(1),
        )


@functools.lru_cache(maxsize=32)
def _compiled_loop(apply_fn, config: Search, targeted: bool, mesh: Mesh, evaluator=None):
    """The device loop, sharded over `mesh` and jitted; cached so repeated runs reuse it."""
    run_queue = functools.partial(
        engine.run_queue,
        apply_fn=apply_fn,
        config=config,
        targeted=targeted,
        evaluator=evaluator,
    )

    def per_device(key, state, queue, final, params, max_iterations):
        queue = queue.replace(length=queue.length[0])
        state, finished, taken = run_queue(key, state, queue, final, params, max_iterations)
        return state, finished.replace(count=finished.count[None]), taken[None]

    sharded, replicated = P("data"), P()
    return jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(replicated, sharded, sharded, replicated, replicated, replicated),
            out_specs=(sharded, sharded, sharded),
            check_vma=False,
        ),
        donate_argnums=(1,),
    )


def attack_arrays(
    key,
    model,
    images: np.ndarray,
    true_labels,
    config: Search,
    *,
    target_labels=None,
    indices=None,
    num_slots: int = 8,
    chunk_size: int | None = None,
    devices=None,
    evaluator="full",
) -> Results:
    """Attacks in-memory images; returns results ordered like the inputs."""
    n = len(images)
    items = WorkItems(
        positions=np.arange(n),
        indices=np.arange(n) if indices is None else np.asarray(indices),
        true_labels=np.asarray(true_labels, np.int32),
        target_labels=(
            np.full(n, -1, np.int32) if target_labels is None else np.asarray(target_labels)
        ),
    )
    targeted = target_labels is not None
    attacker = Attacker(model, config, targeted, num_slots, devices, evaluator)
    chunks = list(attacker.run(key, items, lambda p: images[p], chunk_size or max(n, 1)))
    return Results.concatenate(chunks).sorted_by_work_id()


def predict_probs(model, images, batch_size: int = 1024) -> np.ndarray:
    """Clean softmax probabilities, [N, C], in batches through a jitted forward pass."""
    forward = jitted_probs(model.apply_fn)
    out = []
    for start in range(0, len(images), batch_size):
        batch = jnp.asarray(images[start : start + batch_size], jnp.float32)
        probs, finite = forward(model.params, batch)
        if not finite:
            raise InputError(
                f"model {model.name} returned NaN or infinite logits on clean images "
                f"{start}-{start + len(batch) - 1}; check the weights and the input normalisation"
            )
        out.append(np.asarray(probs))
    return np.concatenate(out) if out else np.zeros((0, model.num_classes), np.float32)


@functools.lru_cache(maxsize=32)
def jitted_probs(apply_fn):
    """`(softmax probabilities, whether every logit is finite)`, jitted once per model;
    the check is on the logits, before the softmax."""

    def forward(params, images):
        logits = apply_fn(params, images).astype(jnp.float32)
        return jax.nn.softmax(logits, axis=-1), jnp.all(jnp.isfinite(logits))

    return jax.jit(forward)
