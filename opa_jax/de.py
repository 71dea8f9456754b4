"""Differential evolution for the one-pixel attack, one pure step over many images.

A candidate is `num_pixels` pixels, each `(x, y, r, g, b)` (x is the row),
flattened to `[num_pixels * 5]` floats (Su et al. 2019, Sec. III-B). An image
of C channels has pixels `(x, y, v_1, ..., v_C)` of `2 + C` genes
(`pixel_genes`), so a grayscale pixel is `(x, y, v)`. Everything
here is written for one image and one member, then vmapped over the population
and over images; `opa_jax.engine` runs the loop on the device.

Fitness is minimised: the true-class probability for non-targeted attacks, the
negated target-class probability for targeted ones. A child replaces its
parent when it is at least as good (Sec. III-C).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from opa_jax.errors import InputError

STRATEGIES = ("rand1", "best1", "random")
INITS = ("paper", "latin_hypercube", "uniform")
BOUNDS_HANDLING = ("clip", "resample")
STOP_RULES = ("threshold", "argmax", "none")

# fold_in tags that keep each use of an image's key apart.
_INIT_TAG = 0x7FFF_FFFF


# Named settings. `paper`: Su et al. 2019, Sec. III-C. `scipy`: SciPy's
# differential_evolution as the public Keras/PyTorch/ART attacks call it
# (best1bin, dithered F, recombination 1, Latin hypercube, stop on a wrong
# argmax). `random`: random search with the paper's query budget.
PRESETS = {
    "paper": dict(
        popsize=400,
        generations=100,
        strategy="rand1",
        mutation=0.5,
        mutation_high=0.0,
        crossover=1.0,
        init="paper",
        bounds_handling="clip",
        stop="threshold",
    ),
    "scipy": dict(
        popsize=400,
        generations=75,
        strategy="best1",
        mutation=0.5,
        mutation_high=1.0,
        crossover=1.0,
        init="latin_hypercube",
        bounds_handling="resample",
        stop="argmax",
    ),
}
PRESETS["random"] = dict(PRESETS["paper"], strategy="random")


@dataclasses.dataclass(frozen=True)
class DEConfig:
    """Static DE hyperparameters (hashable, so jit specialises on them)."""

    num_pixels: int = 1
    popsize: int = 400
    generations: int = 100
    # rand1: x_r1 + F (x_r2 - x_r3); best1: x_best + F (x_r1 - x_r2); random: fresh samples
    # from the initial distribution each generation (the paper's random-search baseline).
    strategy: str = "rand1"
    mutation: float = 0.5  # F, or the low end of the dither range
    mutation_high: float = 0.0  # > mutation: F ~ U[mutation, mutation_high) per generation
    crossover: float = 1.0  # binomial crossover rate; 1.0 means no crossover
    init: str = "paper"  # paper: xy uniform, each channel ~ N(rgb_mean, rgb_std) clipped
    rgb_mean: float = 128.0
    rgb_std: float = 127.0
    bounds_handling: str = "clip"  # clip, or resample out-of-bounds genes uniformly (SciPy)
    stop: str = "threshold"  # threshold, argmax (SciPy callback) or none
    nontargeted_threshold: float = 0.05  # stop once p(true) < this
    targeted_threshold: float = 0.90  # stop once p(target) > this
    round_rgb: bool = True  # applied colours are integers, so adversarial images are real
    channels: int = 3  # of the images: a pixel is x, y and one value per channel

    def __post_init__(self):
        checks = [
            (self.strategy in STRATEGIES, f"de.strategy={self.strategy!r}: expected {STRATEGIES}"),
            (self.init in INITS, f"de.init={self.init!r}: expected one of {INITS}"),
            (
                self.bounds_handling in BOUNDS_HANDLING,
                f"de.bounds_handling={self.bounds_handling!r}: expected {BOUNDS_HANDLING}",
            ),
            (self.stop in STOP_RULES, f"de.stop={self.stop!r}: expected one of {STOP_RULES}"),
            (self.num_pixels >= 1, f"pixels={self.num_pixels}: expected >= 1"),
            (self.channels >= 1, f"channels={self.channels}: expected >= 1"),
            (self.popsize >= 5, f"de.popsize={self.popsize}: expected >= 5"),
            (self.generations >= 0, f"de.generations={self.generations}: expected >= 0"),
            (0.0 <= self.crossover <= 1.0, f"de.crossover={self.crossover}: expected in [0, 1]"),
            (self.mutation > 0, f"de.mutation={self.mutation}: expected > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> DEConfig:
        """A preset's settings, with any non-None override replacing its field."""
        if preset not in PRESETS:
            raise InputError(f"de.preset={preset!r}: expected one of {sorted(PRESETS)}")
        fields = dict(PRESETS[preset])
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)

    @property
    def num_genes(self) -> int:
        return self.num_pixels * pixel_genes(self.channels)

    # The search rule the engine runs (`opa_jax.search.Search`): DE's init, propose, update.
    def empty_state(self, num_classes: int, image_shape) -> ImageState:
        del image_shape  # DE's state does not depend on the image size
        return empty_image_state(self, num_classes)

    def propose(self, key, state: ImageState, fresh, low, high) -> jax.Array:
        return propose(key, state, fresh, self, low, high)

    def update(
        self, state: ImageState, fresh, candidates, probs, true_label, target_label, targeted: bool
    ) -> ImageState:
        return update(state, fresh, candidates, probs, true_label, target_label, self, targeted)

    def outputs(self, state: ImageState) -> dict:
        del state
        return {}

    def record_fields(self, outputs: dict) -> dict:
        del outputs
        return {}


def pixel_genes(channels: int) -> int:
    """The genes of one pixel: x, y and one value per channel (5 for RGB)."""
    return 2 + channels


def image_channels(image_shape) -> int:
    """The channel count of an image shape [H, W, C] (3 for a bare [H, W])."""
    return int(image_shape[2]) if len(image_shape) > 2 else 3


def bounds(image_shape, num_pixels: int) -> tuple[jax.Array, jax.Array]:
    """Lower and upper bounds per gene, `[num_pixels * (2 + C)]` each."""
    height, width = image_shape[0], image_shape[1]
    channels = image_channels(image_shape)
    low = jnp.tile(jnp.zeros(pixel_genes(channels), jnp.float32), num_pixels)
    high = jnp.tile(jnp.array([height, width] + [255.0] * channels, jnp.float32), num_pixels)
    return low, high


def apply_candidate(image: jax.Array, candidate: jax.Array, round_rgb: bool = True) -> jax.Array:
    """Writes a candidate's pixels into one image. image [H, W, C], candidate [k * (2 + C)]."""
    height, width = image.shape[0], image.shape[1]
    pixels = candidate.reshape(-1, pixel_genes(image.shape[-1]))  # [k, 2 + C]
    rows = jnp.clip(jnp.floor(pixels[:, 0]), 0, height - 1).astype(jnp.int32)
    cols = jnp.clip(jnp.floor(pixels[:, 1]), 0, width - 1).astype(jnp.int32)
    rgb = jnp.clip(pixels[:, 2:], 0.0, 255.0)
    if round_rgb:
        rgb = jnp.round(rgb)
    return image.at[rows, cols].set(rgb.astype(image.dtype))


def applied_pixels(candidates: np.ndarray, image_shape, round_rgb: bool = True) -> np.ndarray:
    """The pixels a candidate actually writes, [..., k, 2 + C]: integer x, y and clipped
    colour."""
    shape = np.shape(candidates)
    genes = pixel_genes(image_channels(image_shape))
    pixels = np.asarray(candidates, np.float64).reshape(*shape[:-1], shape[-1] // genes, genes)
    pixels = pixels.copy()
    pixels[..., 0] = np.clip(np.floor(pixels[..., 0]), 0, image_shape[0] - 1)
    pixels[..., 1] = np.clip(np.floor(pixels[..., 1]), 0, image_shape[1] - 1)
    pixels[..., 2:] = np.clip(pixels[..., 2:], 0, 255)
    if round_rgb:
        pixels[..., 2:] = np.round(pixels[..., 2:])
    return pixels


def init_population(key, config: DEConfig, low, high) -> jax.Array:
    """The initial population for one image, [popsize, genes] (Sec. III-C)."""
    shape = (config.popsize, config.num_genes)
    key_uniform, key_normal, key_perm = jax.random.split(key, 3)
    unit = jax.random.uniform(key_uniform, shape)
    if config.init == "latin_hypercube":
        # One sample per stratum in every gene, strata shuffled per gene (as SciPy).
        strata = (jnp.arange(config.popsize)[:, None] + unit) / config.popsize
        order = jnp.argsort(jax.random.uniform(key_perm, shape), axis=0)
        unit = jnp.take_along_axis(strata, order, axis=0)
    population = low + unit * (high - low)
    if config.init == "paper":
        is_colour = (jnp.arange(config.num_genes) % pixel_genes(config.channels)) >= 2
        colours = config.rgb_mean + config.rgb_std * jax.random.normal(key_normal, shape)
        population = jnp.where(is_colour, colours, population)
    return jnp.clip(population, low, high)


def _distinct_others(key, popsize: int, count: int) -> jax.Array:
    """For every member i, `count` distinct indices in [0, popsize) other than i. [popsize, count].

    Draw r_j uniformly from popsize - 1 - j values, then shift it past each
    index already taken (i, r_1, ..., r_{j-1}) in increasing order: exact
    sampling without replacement, in a few vector ops.
    """
    draws = jax.random.randint(
        key, (popsize, count), 0, popsize - 1 - jnp.arange(count)
    )  # [popsize, count]
    taken = jnp.arange(popsize)[:, None]  # [popsize, 1], sorted per row
    picks = []
    for j in range(count):
        r = draws[:, j]
        for e in range(j + 1):  # taken[:, e] is the e-th smallest excluded index
            r = r + (r >= taken[:, e])
        picks.append(r)
        taken = jnp.sort(jnp.concatenate([taken, r[:, None]], axis=1), axis=1)
    return jnp.stack(picks, axis=1)


def mutate(key, population, fitness, config: DEConfig, low, high) -> jax.Array:
    """Trial vectors for one image: mutation, crossover, bounds. [popsize, genes]."""
    popsize, genes = population.shape
    if config.strategy == "random":
        return init_population(key, config, low, high)
    key_f, key_idx, key_cross, key_jrand, key_resample = jax.random.split(key, 5)
    if config.mutation_high > config.mutation:  # SciPy's dither: one F per generation
        scale = jax.random.uniform(key_f, (), minval=config.mutation, maxval=config.mutation_high)
    else:
        scale = config.mutation
    count = 3 if config.strategy == "rand1" else 2
    idx = _distinct_others(key_idx, popsize, count)  # [popsize, count]
    if config.strategy == "rand1":
        base = population[idx[:, 0]]
        diff = population[idx[:, 1]] - population[idx[:, 2]]
    else:
        base = population[jnp.argmin(fitness)][None, :]
        diff = population[idx[:, 0]] - population[idx[:, 1]]
    mutant = base + scale * diff
    if config.crossover < 1.0:  # binomial crossover, one gene always from the mutant
        take = jax.random.uniform(key_cross, (popsize, genes)) < config.crossover
        j_rand = jax.random.randint(key_jrand, (popsize, 1), 0, genes)
        take = take | (jnp.arange(genes)[None, :] == j_rand)
        mutant = jnp.where(take, mutant, population)
    if config.bounds_handling == "resample":
        outside = (mutant < low) | (mutant > high)
        fresh = low + jax.random.uniform(key_resample, mutant.shape) * (high - low)
        mutant = jnp.where(outside, fresh, mutant)
    return jnp.clip(mutant, low, high)


def objective(probs, true_label, target_label, targeted: bool):
    """Fitness to minimise and whether each candidate is adversarial, for one image.

    probs [popsize, C]; the labels are scalars.
    """
    predicted = jnp.argmax(probs, axis=-1)
    if targeted:
        return -probs[..., target_label], predicted == target_label
    return probs[..., true_label], predicted != true_label


def stop_reached(fitness, is_adv, config: DEConfig, targeted: bool):
    """The early-stop rule, for each candidate."""
    if config.stop == "argmax":
        return is_adv
    if config.stop == "threshold":
        if targeted:
            return -fitness > config.targeted_threshold
        return fitness < config.nontargeted_threshold
    return jnp.zeros_like(is_adv)


@struct.dataclass
class ImageState:
    """DE state of one image (vmapped over in-flight slots)."""

    population: jax.Array  # [popsize, genes]
    fitness: jax.Array  # [popsize]
    best_candidate: jax.Array  # [genes] best seen: adversarial first, then by fitness
    best_fitness: jax.Array  # []
    best_is_adv: jax.Array  # [] bool
    best_probs: jax.Array  # [C]
    generation: jax.Array  # [] int32, 0 after the initial population
    queries: jax.Array  # [] int32, candidate evaluations of this image
    stopped: jax.Array  # [] bool


def empty_image_state(config: DEConfig, num_classes: int) -> ImageState:
    genes = config.num_genes
    return ImageState(
        population=jnp.zeros((config.popsize, genes), jnp.float32),
        fitness=jnp.full((config.popsize,), jnp.inf, jnp.float32),
        best_candidate=jnp.zeros((genes,), jnp.float32),
        best_fitness=jnp.array(jnp.inf, jnp.float32),
        best_is_adv=jnp.array(False),
        best_probs=jnp.zeros((num_classes,), jnp.float32),
        generation=jnp.array(0, jnp.int32),
        queries=jnp.array(0, jnp.int32),
        stopped=jnp.array(False),
    )


def propose(key, state: ImageState, fresh, config: DEConfig, low, high) -> jax.Array:
    """Candidates to evaluate for one image: its initial population when `fresh`."""
    initial = init_population(jax.random.fold_in(key, _INIT_TAG), config, low, high)
    trial_key = jax.random.fold_in(key, state.generation + 1)
    trial = mutate(trial_key, state.population, state.fitness, config, low, high)
    return jnp.where(fresh, initial, trial)


def update(
    state: ImageState,
    fresh,
    candidates,
    probs,
    true_label,
    target_label,
    config: DEConfig,
    targeted: bool,
) -> ImageState:
    """Selection, best tracking and the stop rule after evaluating `candidates`."""
    fitness, is_adv = objective(probs, true_label, target_label, targeted)  # [popsize] each
    # Selection (Sec. III-C): a child replaces its parent when at least as good.
    replace = fresh | (fitness <= state.fitness)
    population = jnp.where(replace[:, None], candidates, state.population)
    new_fitness = jnp.where(replace, fitness, state.fitness)
    # Best over every evaluated candidate: adversarial ones first, then by fitness.
    rank = jnp.where(is_adv, fitness - 4.0, fitness)  # fitness lies in [-1, 1]
    i = jnp.argmin(rank)
    old_rank = jnp.where(state.best_is_adv, state.best_fitness - 4.0, state.best_fitness)
    better = fresh | (rank[i] < old_rank)
    generation = jnp.where(fresh, 0, state.generation + 1)
    hit = jnp.any(stop_reached(fitness, is_adv, config, targeted))
    return ImageState(
        population=population,
        fitness=new_fitness,
        best_candidate=jnp.where(better, candidates[i], state.best_candidate),
        best_fitness=jnp.where(better, fitness[i], state.best_fitness),
        best_is_adv=jnp.where(better, is_adv[i], state.best_is_adv),
        best_probs=jnp.where(better, probs[i], state.best_probs),
        generation=generation,
        queries=jnp.where(fresh, 0, state.queries) + config.popsize,
        stopped=hit | (generation >= config.generations),
    )
