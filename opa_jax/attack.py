"""Host side of an attack: streams work items through the device loop in chunks.

Only one chunk of images is on the device at a time, so memory stays flat in
the number of images; finished results come back after every chunk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from opa_jax import de, engine
from opa_jax.errors import InputError


@dataclasses.dataclass
class WorkItems:
    """What to attack: one row per (image, target) pair."""

    positions: np.ndarray  # [N] position in the dataset, passed to read_images
    indices: np.ndarray  # [N] dataset index (keys the random stream)
    true_labels: np.ndarray  # [N]
    target_labels: np.ndarray  # [N], -1 when non-targeted

    def __len__(self):
        return len(self.positions)


@dataclasses.dataclass
class Results:
    """Per-item results of a finished chunk, rows in finishing order."""

    work_ids: np.ndarray  # [R] row in the WorkItems
    success: np.ndarray  # [R] bool
    perturbation: np.ndarray  # [R, num_pixels, 5] as applied: integer x, y; clipped colour
    adv_probs: np.ndarray  # [R, C]
    generations: np.ndarray  # [R]
    queries: np.ndarray  # [R]

    @property
    def adv_label(self):
        return self.adv_probs.argmax(-1)

    @property
    def adv_prob(self):
        return self.adv_probs.max(-1)


@dataclasses.dataclass
class Progress:
    evaluations: float = 0.0  # model evaluations spent by the loop
    active_evaluations: float = 0.0  # of those, on unfinished images
    iterations: int = 0


class Attacker:
    """Holds the compiled loop for one model and DE config; `run` streams items through it."""

    def __init__(self, model, config: de.DEConfig, targeted: bool, num_slots: int):
        if num_slots < 1:
            raise InputError(f"slots={num_slots}: expected >= 1")
        self.model = model
        self.config = config
        self.targeted = targeted
        self.num_slots = num_slots
        self._run_queue = engine.compile_run_queue(model.apply_fn, config, targeted)

    def run(
        self,
        key,
        items: WorkItems,
        read_images: Callable[[Sequence[int]], np.ndarray],
        chunk_size: int,
        progress: Progress | None = None,
    ) -> Iterator[Results]:
        """Yields the results of each chunk as soon as the device returns them."""
        image_shape = tuple(self.model.image_shape)
        state = engine.init_state(self.num_slots, image_shape, self.model.num_classes, self.config)
        n = len(items)
        starts = list(range(0, n, chunk_size)) or [0]
        for start in starts:
            stop = min(start + chunk_size, n)
            queue = engine.empty_queue(chunk_size, image_shape)
            if stop > start:
                images = read_images(items.positions[start:stop])
                if images.shape[1:] != image_shape:
                    raise InputError(
                        f"images have shape {images.shape[1:]}, but model {self.model.name} "
                        f"expects {image_shape}"
                    )
                queue.images[: stop - start] = images
                queue.true_labels[: stop - start] = items.true_labels[start:stop]
                queue.target_labels[: stop - start] = items.target_labels[start:stop]
                queue.indices[: stop - start] = items.indices[start:stop]
                queue.work_ids[: stop - start] = np.arange(start, stop)
            queue = queue.replace(length=np.asarray(stop - start, np.int32))
            final = np.asarray(stop >= n)
            state, finished = self._run_queue(key, state, queue, final, self.model.params)
            finished = jax.device_get(finished)
            if bool(state.nan_seen):
                raise InputError(
                    f"model {self.model.name} returned NaN or infinite outputs during the attack; "
                    "check the weights and the input normalisation"
                )
            if progress is not None:
                progress.evaluations = float(state.evaluations)
                progress.active_evaluations = float(state.active_evaluations)
                progress.iterations = int(state.iterations)
            count = int(finished.count)
            yield Results(
                work_ids=finished.work_ids[:count],
                success=finished.success[:count],
                perturbation=de.applied_pixels(
                    finished.candidate[:count], image_shape, self.config.round_rgb
                ),
                adv_probs=finished.probs[:count],
                generations=finished.generations[:count],
                queries=finished.queries[:count],
            )


def attack_arrays(
    key,
    model,
    images: np.ndarray,
    true_labels,
    config: de.DEConfig,
    *,
    target_labels=None,
    indices=None,
    num_slots: int = 8,
    chunk_size: int | None = None,
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
    attacker = Attacker(model, config, targeted, num_slots)
    chunks = list(attacker.run(key, items, lambda p: images[p], chunk_size or max(n, 1)))
    merged = Results(*[np.concatenate([getattr(c, f.name) for c in chunks])
                       for f in dataclasses.fields(Results)])  # fmt: skip
    order = np.argsort(merged.work_ids)
    return Results(*[getattr(merged, f.name)[order] for f in dataclasses.fields(Results)])


def predict_probs(model, images, batch_size: int = 1024) -> np.ndarray:
    """Clean softmax probabilities, [N, C], in batches through a jitted forward pass."""
    forward = _jitted_probs(model.apply_fn)
    out = []
    for start in range(0, len(images), batch_size):
        batch = jnp.asarray(images[start : start + batch_size], jnp.float32)
        out.append(np.asarray(forward(model.params, batch)))
    probs = np.concatenate(out) if out else np.zeros((0, model.num_classes), np.float32)
    if not np.all(np.isfinite(probs)):
        raise InputError(f"model {model.name} returned NaN or infinite outputs on clean images")
    return probs


_FORWARD_CACHE: dict = {}


def _jitted_probs(apply_fn):
    if apply_fn not in _FORWARD_CACHE:
        _FORWARD_CACHE[apply_fn] = jax.jit(lambda p, x: jax.nn.softmax(apply_fn(p, x), axis=-1))
    return _FORWARD_CACHE[apply_fn]
