"""Exhaustive one-pixel search: every position times a set of colours, in a fixed order.

The grid holds `H * W * C` candidates, position-major in raster order (row,
then column), the colours inner. With the 8 corners of the RGB cube (the
colours DE's best one-pixel candidates end on, and those Sparse-RS sets;
Croce et al., AAAI 2022) a CIFAR-10 image has 8,192 candidates, a fifth of the
paper's 400 x 101 DE queries, and the search answers exactly whether any of
them fools the model.

Each generation hands the engine the next chunk of `popsize` grid candidates,
so the search runs in the same device loop as DE (slots, sharding, the
incremental evaluator, resume). Nothing is random, and every candidate's
place in the order is fixed, so the records do not depend on the chunk, the
slot or device count, or the evaluator (beyond float rounding of the
probabilities).

`stop`:
- `first`: stop at the first candidate in the order that fools (non-targeted:
  argmax not the true class; targeted: argmax the target). `queries` is that
  candidate's place in the order, counting from 1: the queries a sequential
  search in the same order would make. The device evaluates whole chunks.
- `none`: evaluate the whole grid, and record the best candidate (fooling
  ones first, then by fitness), the number of fooling candidates and
  positions, the vulnerable positions and every class reached.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from opa_jax import de
from opa_jax.errors import InputError

STOP_RULES = ("first", "none")


def colour_set(spec: str, channels: int = 3) -> np.ndarray:
    """The colours of `spec`, [colours, channels] float32: `corners` (the 8 corners of the
    RGB cube; black and white for one channel) or `levels:N` (N evenly spaced levels per
    channel, 0 and 255 included: N**channels)."""
    if spec == "corners":
        levels = np.array([0.0, 255.0])
    elif spec.startswith("levels:") and spec[7:].isdigit() and int(spec[7:]) >= 2:
        levels = np.round(np.linspace(0.0, 255.0, int(spec[7:])))
    else:
        raise InputError(
            f"exhaustive.colours={spec!r}: expected 'corners' or 'levels:N' with N >= 2"
        )
    return np.asarray(list(itertools.product(levels, repeat=channels)), np.float32)


@dataclasses.dataclass(frozen=True)
class ExhaustiveConfig:
    """The one-pixel grid search over `image_shape` (H, W) and `colours`."""

    image_shape: tuple[int, int]
    colours: str = "corners"
    stop: str = "first"
    popsize: int = 512  # grid candidates per generation
    num_pixels: int = 1
    round_rgb: bool = True
    channels: int = 3  # of the images: a pixel is x, y and one value per channel

    def __post_init__(self):
        colour_set(self.colours)  # checks the spec
        if self.stop not in STOP_RULES:
            raise InputError(f"exhaustive.stop={self.stop!r}: expected one of {STOP_RULES}")
        if self.popsize < 1:
            raise InputError(f"exhaustive.popsize={self.popsize}: expected >= 1")
        if self.num_pixels != 1:
            raise InputError(f"pixels={self.num_pixels}: the exhaustive search is one pixel")

    @property
    def num_genes(self) -> int:
        return de.pixel_genes(self.channels)

    @property
    def num_colours(self) -> int:
        return len(colour_set(self.colours, self.channels))

    @property
    def grid_size(self) -> int:
        height, width = self.image_shape
        return height * width * self.num_colours

    @property
    def generations(self) -> int:
        """Chunks in the grid: the generations of an image that nothing fools."""
        return -(-self.grid_size // self.popsize)

    def empty_state(self, num_classes: int, image_shape) -> GridState:
        del image_shape  # the grid's own image_shape sizes the state
        height, width = self.image_shape
        return GridState(
            best_candidate=jnp.zeros((self.num_genes,), jnp.float32),
            best_fitness=jnp.array(jnp.inf, jnp.float32),
            best_is_adv=jnp.array(False),
            best_probs=jnp.zeros((num_classes,), jnp.float32),
            generation=jnp.array(0, jnp.int32),
            queries=jnp.array(0, jnp.int32),
            stopped=jnp.array(False),
            fooling_candidates=jnp.array(0, jnp.int32),
            vulnerable=jnp.zeros((height * width,), bool),
            classes_reached=jnp.zeros((num_classes,), bool),
        )

    def _chunk(self, state: GridState, fresh):
        """This generation's grid indices [popsize], clamped to the grid, and which are
        real (the last chunk may run past the grid's end)."""
        chunk = jnp.where(fresh, 0, state.generation)
        index = chunk * self.popsize + jnp.arange(self.popsize, dtype=jnp.int32)
        return jnp.minimum(index, self.grid_size - 1), index < self.grid_size, chunk

    def propose(self, key, state: GridState, fresh, low, high) -> jax.Array:
        del key, low, high  # the grid is fixed
        index, _, _ = self._chunk(state, fresh)
        position, colour = jnp.divmod(index, self.num_colours)
        row, col = jnp.divmod(position, self.image_shape[1])
        rgb = jnp.asarray(colour_set(self.colours, self.channels))[colour]  # [popsize, C]
        return jnp.concatenate(
            [row[:, None].astype(jnp.float32), col[:, None].astype(jnp.float32), rgb], axis=1
        )  # [popsize, 2 + C]

    def update(
        self, state: GridState, fresh, candidates, probs, true_label, target_label, targeted: bool
    ) -> GridState:
        state = jax.tree.map(
            lambda empty, old: jnp.where(fresh, empty, old),
            self.empty_state(probs.shape[-1], None),
            state,
        )
        index, real, chunk = self._chunk(state, fresh)
        fitness, is_adv = de.objective(probs, true_label, target_label, targeted)  # [popsize]
        fitness = jnp.where(real, fitness, jnp.inf)
        is_adv = is_adv & real
        first = jnp.argmax(is_adv)  # the first fooling candidate in the order, if any
        found = jnp.any(is_adv)
        rank = jnp.where(is_adv, fitness - 4.0, fitness)  # fooling first; fitness in [-1, 1]
        if self.stop == "first":
            i = jnp.where(found, first, jnp.argmin(fitness))
            is_adv = is_adv & (jnp.arange(self.popsize) <= first)  # nothing after the stop
        else:
            i = jnp.argmin(rank)  # the earliest of the best
        old_rank = jnp.where(state.best_is_adv, state.best_fitness - 4.0, state.best_fitness)
        better = rank[i] < old_rank  # strict: an earlier candidate keeps its place
        position = index // self.num_colours
        vulnerable = state.vulnerable.at[position].max(is_adv)
        predicted = jnp.argmax(probs, axis=-1)
        classes_reached = state.classes_reached.at[predicted].max(is_adv)
        generation = chunk + 1
        evaluated = jnp.minimum(generation * self.popsize, self.grid_size)
        stop_now = found & (self.stop == "first")
        return GridState(
            best_candidate=jnp.where(better, candidates[i], state.best_candidate),
            best_fitness=jnp.where(better, fitness[i], state.best_fitness),
            best_is_adv=jnp.where(better, is_adv[i], state.best_is_adv),
            best_probs=jnp.where(better, probs[i], state.best_probs),
            generation=generation,
            queries=jnp.where(stop_now, index[first] + 1, evaluated).astype(jnp.int32),
            stopped=stop_now | (evaluated >= self.grid_size),
            fooling_candidates=state.fooling_candidates + jnp.sum(is_adv, dtype=jnp.int32),
            vulnerable=vulnerable,
            classes_reached=classes_reached,
        )

    def outputs(self, state: GridState) -> dict:
        return {
            "fooling_candidates": state.fooling_candidates,
            "vulnerable": state.vulnerable,
            "classes_reached": state.classes_reached,
        }

    def record_fields(self, outputs: dict) -> dict:
        vulnerable = np.flatnonzero(outputs["vulnerable"])
        return {
            "fooling_candidates": int(outputs["fooling_candidates"]),
            "fooling_positions": len(vulnerable),
            "vulnerable_pixels": vulnerable.tolist(),  # row * W + column
            "classes_reached": np.flatnonzero(outputs["classes_reached"]).tolist(),
            "grid_size": self.grid_size,
            "search_complete": self.stop == "none",
        }


@struct.dataclass
class GridState:
    """Exhaustive-search state of one image (vmapped over in-flight slots)."""

    best_candidate: jax.Array  # [2 + C]
    best_fitness: jax.Array  # []
    best_is_adv: jax.Array  # [] bool
    best_probs: jax.Array  # [C]
    generation: jax.Array  # [] int32: chunks evaluated
    queries: jax.Array  # [] int32
    stopped: jax.Array  # [] bool
    fooling_candidates: jax.Array  # [] int32
    vulnerable: jax.Array  # [H * W] bool: positions where some colour fools
    classes_reached: jax.Array  # [C] bool: adversarial labels seen
