"""Random search over corner colours for k pixels, in the manner of Sparse-RS.

Sparse-RS (Croce et al., AAAI 2022) keeps one current perturbation of k
pixels, each set to a corner of the colour cube, and proposes changes to it,
keeping a change when it is at least as good. Here every generation proposes
`popsize` changes at once, each moving one of the k pixels to a fresh random
position with a random colour of the set, and the best of them replaces the
current perturbation when it is at least as good. The first generation is
`popsize` random perturbations, of which the best becomes the current one.

Its fitness, its best tracking and its stop rules are DE's (`opa_jax.de`):
`argmax` stops at the first fooling candidate, `threshold` at the paper's
probability thresholds, `none` runs every generation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from opa_jax import de, exhaustive
from opa_jax.errors import InputError

STOP_RULES = ("argmax", "threshold", "none")


@dataclasses.dataclass(frozen=True)
class CornerSearchConfig:
    """Random search over `colours` for `num_pixels` pixels of an `image_shape` (H, W) image."""

    image_shape: tuple[int, int]
    num_pixels: int = 1
    popsize: int = 400
    generations: int = 100
    colours: str = "corners"
    stop: str = "argmax"
    nontargeted_threshold: float = 0.05  # stop == threshold: p(true) below this
    targeted_threshold: float = 0.90  # and p(target) above this
    round_rgb: bool = True
    channels: int = 3  # of the images: a pixel is x, y and one value per channel

    def __post_init__(self):
        exhaustive.colour_set(self.colours)
        checks = [
            (self.stop in STOP_RULES, f"corner_search.stop={self.stop!r}: expected {STOP_RULES}"),
            (self.num_pixels >= 1, f"pixels={self.num_pixels}: expected >= 1"),
            (self.popsize >= 1, f"corner_search.popsize={self.popsize}: expected >= 1"),
            (self.generations >= 0, f"corner_search.generations={self.generations}: expected >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)

    @property
    def num_genes(self) -> int:
        return self.num_pixels * de.pixel_genes(self.channels)

    def empty_state(self, num_classes: int, image_shape) -> CornerState:
        del image_shape
        return CornerState(
            current=jnp.zeros((self.num_genes,), jnp.float32),
            current_fitness=jnp.array(jnp.inf, jnp.float32),
            best_candidate=jnp.zeros((self.num_genes,), jnp.float32),
            best_fitness=jnp.array(jnp.inf, jnp.float32),
            best_is_adv=jnp.array(False),
            best_probs=jnp.zeros((num_classes,), jnp.float32),
            generation=jnp.array(0, jnp.int32),
            queries=jnp.array(0, jnp.int32),
            stopped=jnp.array(False),
        )

    def _random_pixels(self, key, shape) -> jax.Array:
        """Pixels at uniform positions with uniform colours of the set, [*shape, 2 + C]."""
        colours = jnp.asarray(exhaustive.colour_set(self.colours, self.channels))
        key_pos, key_colour = jax.random.split(key)
        height, width = self.image_shape
        position = jax.random.randint(key_pos, shape, 0, height * width)
        row, col = jnp.divmod(position, width)
        rgb = colours[jax.random.randint(key_colour, shape, 0, len(colours))]
        return jnp.concatenate(
            [row[..., None].astype(jnp.float32), col[..., None].astype(jnp.float32), rgb], -1
        )

    def propose(self, key, state: CornerState, fresh, low, high) -> jax.Array:
        del low, high
        k = self.num_pixels
        # A fresh slot still holds its previous image's state: key on 0 there.
        step = jnp.where(fresh, 0, state.generation + 1)
        key_init, key_step = jax.random.split(jax.random.fold_in(key, step))
        initial = self._random_pixels(key_init, (self.popsize, k)).reshape(self.popsize, -1)
        key_which, key_new = jax.random.split(key_step)
        which = jax.random.randint(key_which, (self.popsize,), 0, k)  # the pixel to move
        moved = self._random_pixels(key_new, (self.popsize,))  # [popsize, 2 + C]
        current = state.current.reshape(k, -1)
        trial = jnp.where(
            (jnp.arange(k)[None, :, None] == which[:, None, None]), moved[:, None, :], current
        ).reshape(self.popsize, -1)  # [popsize, k * (2 + C)]
        return jnp.where(fresh, initial, trial)

    def update(
        self, state: CornerState, fresh, candidates, probs, true_label, target_label, targeted: bool
    ) -> CornerState:
        fitness, is_adv = de.objective(probs, true_label, target_label, targeted)
        i = jnp.argmin(fitness)
        keep = fresh | (fitness[i] <= state.current_fitness)
        rank = jnp.where(is_adv, fitness - 4.0, fitness)
        j = jnp.argmin(rank)
        old_rank = jnp.where(state.best_is_adv, state.best_fitness - 4.0, state.best_fitness)
        better = fresh | (rank[j] < old_rank)
        generation = jnp.where(fresh, 0, state.generation + 1)
        hit = jnp.any(de.stop_reached(fitness, is_adv, self, targeted))
        return CornerState(
            current=jnp.where(keep, candidates[i], state.current),
            current_fitness=jnp.where(keep, fitness[i], state.current_fitness),
            best_candidate=jnp.where(better, candidates[j], state.best_candidate),
            best_fitness=jnp.where(better, fitness[j], state.best_fitness),
            best_is_adv=jnp.where(better, is_adv[j], state.best_is_adv),
            best_probs=jnp.where(better, probs[j], state.best_probs),
            generation=generation,
            queries=jnp.where(fresh, 0, state.queries) + self.popsize,
            stopped=hit | (generation >= self.generations),
        )

    def outputs(self, state: CornerState) -> dict:
        del state
        return {}

    def record_fields(self, outputs: dict) -> dict:
        del outputs
        return {}


@struct.dataclass
class CornerState:
    """Corner-search state of one image (vmapped over in-flight slots)."""

    current: jax.Array  # [genes] the perturbation the proposals change
    current_fitness: jax.Array  # []
    best_candidate: jax.Array  # [genes]
    best_fitness: jax.Array  # []
    best_is_adv: jax.Array  # [] bool
    best_probs: jax.Array  # [C]
    generation: jax.Array  # [] int32
    queries: jax.Array  # [] int32
    stopped: jax.Array  # [] bool
