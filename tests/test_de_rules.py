"""The DE operators one rule at a time: populations built so that each rule shows.

Each test sets up a population where the rule's effect is exact (e.g. all
members equal but one, so that best1's mutants equal the best member), so a
broken rule fails it, not only a broken bound.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opa_jax import de


@functools.cache
def jitted_mutate(config, image_shape):
    """de.mutate for one config, compiled once (random draws are slow to compile on a CPU)."""
    low, high = de.bounds(image_shape, config.num_pixels)
    return jax.jit(functools.partial(de.mutate, config=config, low=low, high=high))


def mutants_for_keys(count, population, fitness, config, image_shape, seed=0):
    """de.mutate once per key, [count, popsize, genes]."""
    mutate = jitted_mutate(config, image_shape)
    keys = jax.random.split(jax.random.key(seed), count)
    return np.stack([np.asarray(mutate(key, population, fitness)) for key in keys])


# ---------------------------------------------------------------------------
# best1 and the dithered F of the scipy preset.


def test_best1_builds_every_mutant_on_the_best_member():
    """All members equal but the best: x_best + F (x_r1 - x_r2) is x_best exactly whenever
    neither partner is the best member (37 of 39 draws)."""
    popsize, best = 40, 7
    common = np.array([10.5, 20.5, 100.0, 100.0, 100.0], np.float32)
    special = np.array([40.5, 30.5, 200.0, 50.0, 150.0], np.float32)
    population = np.tile(common, (popsize, 1))
    population[best] = special
    fitness = np.full(popsize, 0.9, np.float32)
    fitness[best] = 0.1  # minimised: member 7 is the best
    scipy = de.DEConfig.from_preset("scipy", popsize=popsize)
    assert (scipy.strategy, scipy.mutation, scipy.mutation_high) == ("best1", 0.5, 1.0)
    mutants = mutants_for_keys(20, population, fitness, scipy, (64, 64, 3))
    on_best = np.all(mutants == special, axis=-1).mean()
    assert 0.9 < on_best < 0.99, on_best  # expected 1/40 + 39/40 * 37/39 = 0.95


def test_scipy_dither_draws_one_f_per_generation_uniform_in_its_range():
    """Half the members at A (the best among them), half at B: every mutant is A or
    A +- F (B - A), so F can be read off each mutant. SciPy draws one F per
    generation, uniform in [0.5, 1)."""
    popsize = 40
    a = np.array([20.0, 20.0, 100.0, 100.0, 100.0], np.float32)
    b = np.array([30.0, 30.0, 140.0, 140.0, 140.0], np.float32)
    population = np.where(np.arange(popsize)[:, None] % 2 == 0, a, b).astype(np.float32)
    fitness = np.where(np.arange(popsize) % 2 == 0, 0.5, 0.6).astype(np.float32)
    fitness[0] = 0.1  # the best member is at A
    config = de.DEConfig.from_preset("scipy", popsize=popsize)
    mutants = mutants_for_keys(300, population, fitness, config, (64, 64, 3))
    scales = np.abs(mutants - a) / (b - a)  # [keys, popsize, genes]: 0 or F
    f_per_generation = []
    for generation in scales:
        moved = generation[generation.max(-1) > 0]  # members with a partner at B
        assert len(moved) > 0
        np.testing.assert_allclose(moved, moved[0, 0], rtol=1e-5)  # one F for all
        f_per_generation.append(moved[0, 0])
    f = np.asarray(f_per_generation)
    assert 0.5 <= f.min() < 0.52 and 0.98 < f.max() < 1.0, (f.min(), f.max())
    assert abs(f.mean() - 0.75) < 0.02 and abs(np.median(f) - 0.75) < 0.03


# ---------------------------------------------------------------------------
# Bounds: resampling against clipping, through the scipy preset's own steps.


def red_pixel_probs(images):
    """Three classes; class 1 once pixel (5, 7) is bright red (a smooth landscape)."""
    red = images[:, 5, 7, 0]
    logits = jnp.stack([jnp.zeros_like(red), 0.05 * (red - 200.0), jnp.full_like(red, -3.0)], -1)
    return jax.nn.softmax(logits)


def proposed_candidates(config, image_shape, generations, seed=0):
    """Every trial vector the DE steps propose for one grey image over `generations`
    (after the initial population), [generations, popsize, genes]."""
    low, high = de.bounds(image_shape, config.num_pixels)
    image = jnp.full(image_shape, 100.0)

    @jax.jit
    def step(key, state, fresh):
        candidates = de.propose(key, state, fresh, config, low, high)
        probs = red_pixel_probs(jax.vmap(de.apply_candidate, (None, 0))(image, candidates))
        return candidates, de.update(state, fresh, candidates, probs, 0, -1, config, False)

    key = jax.random.key(seed)
    state = de.empty_image_state(config, 3)
    _, state = step(key, state, True)
    trials = []
    for _ in range(generations):
        candidates, state = step(key, state, False)
        trials.append(np.asarray(candidates))
    return np.stack(trials), np.asarray(low), np.asarray(high)


def test_resampled_genes_almost_never_sit_on_a_bound_while_clipped_ones_do():
    """SciPy redraws an out-of-bounds gene uniformly inside the bounds; clipping puts it
    on the bound. The scipy preset's best1 with F in [0.5, 1) steps out of bounds often."""
    config = de.DEConfig.from_preset("scipy", popsize=50, stop="none")
    assert config.bounds_handling == "resample"
    image_shape = (12, 20, 3)
    resampled, low, high = proposed_candidates(config, image_shape, 12)
    clipped, _, _ = proposed_candidates(
        de.DEConfig.from_preset("scipy", popsize=50, stop="none", bounds_handling="clip"),
        image_shape, 12,
    )  # fmt: skip
    for trials in (resampled, clipped):
        assert np.all((trials >= low) & (trials <= high))
    on_bound = lambda trials: np.mean((trials == low) | (trials == high))
    # A uniform redraw lands exactly on the lower bound with probability ~2^-24.
    assert on_bound(resampled) < 1e-3, on_bound(resampled)
    assert on_bound(clipped) > 0.05, on_bound(clipped)


# ---------------------------------------------------------------------------
# Binomial crossover.


def interior_population(popsize, num_pixels, image_shape, seed=0):
    """Members in the middle of the box, so that F = 0.5 mutants never leave it."""
    low, high = de.bounds(image_shape, num_pixels)
    unit = np.random.default_rng(seed).uniform(0.3, 0.7, (popsize, 5 * num_pixels))
    return (np.asarray(low) + unit * np.asarray(high - low)).astype(np.float32)


@pytest.mark.parametrize("crossover", [0.0, 0.3])
def test_binomial_crossover_takes_genes_at_its_rate_and_always_one(crossover):
    """A trial gene differs from its parent's iff it comes from the mutant (the mutant's
    genes are continuous, so they never equal the parent's by chance). Each gene comes
    from the mutant with probability CR, and one uniformly chosen gene always does."""
    popsize, num_pixels, image_shape = 400, 3, (32, 32, 3)
    genes = 5 * num_pixels
    population = interior_population(popsize, num_pixels, image_shape)
    fitness = np.random.default_rng(1).uniform(0, 1, popsize).astype(np.float32)
    config = de.DEConfig(num_pixels=num_pixels, popsize=popsize, crossover=crossover)
    trials = mutants_for_keys(4, population, fitness, config, image_shape)
    from_mutant = trials != population  # [keys, popsize, genes]
    per_member = from_mutant.sum(-1)
    assert per_member.min() >= 1  # j_rand: never a copy of the parent
    rate = from_mutant.mean()
    expected = 1 - (1 - crossover) * (1 - 1 / genes)
    assert abs(rate - expected) < 0.03, (rate, expected)
    if crossover == 0.0:  # only j_rand: exactly one gene, uniform over all 15
        assert per_member.max() == 1
        per_gene = from_mutant.sum((0, 1))  # 1600 draws over 15 genes: about 107 each
        assert per_gene.min() > 60 and per_gene.max() < 160, per_gene


# ---------------------------------------------------------------------------
# The gene layout, bounds, non-square images and unrounded colours.


def test_three_pixel_candidate_writes_pixel_j_from_genes_5j_to_5j_plus_4():
    """For one pixel, reshape(-1, 5) and reshape(5, -1).T agree; for three they do not."""
    candidate = np.array(
        [1, 2, 10, 20, 30, 4, 0, 40, 50, 60, 3, 5, 70, 80, 90], np.float32
    )  # (x, y, r, g, b) of pixel 0, then pixel 1, then pixel 2
    image = np.zeros((6, 8, 3), np.float32)
    out = np.asarray(de.apply_candidate(jnp.asarray(image), jnp.asarray(candidate)))
    expected = image.copy()
    expected[1, 2] = (10, 20, 30)
    expected[4, 0] = (40, 50, 60)
    expected[3, 5] = (70, 80, 90)
    np.testing.assert_array_equal(out, expected)
    pixels = de.applied_pixels(candidate, image.shape)
    np.testing.assert_array_equal(pixels, candidate.reshape(3, 5))
    low, high = de.bounds(image.shape, 3)
    np.testing.assert_array_equal(low, np.zeros(15))
    np.testing.assert_array_equal(high, np.tile([6, 8, 255, 255, 255], 3))


@pytest.mark.parametrize("image_shape", [(6, 10, 3), (10, 6, 3)])
def test_non_square_images_bound_rows_by_height_and_columns_by_width(image_shape):
    height, width = image_shape[:2]
    low, high = de.bounds(image_shape, 2)
    np.testing.assert_array_equal(high, np.tile([height, width, 255, 255, 255], 2))
    # The upper bounds themselves (reachable by clipping) land on the last row and column.
    candidate = np.array([height, width, 1, 2, 3, height - 0.01, 0.99, 4, 5, 6], np.float32)
    image = np.zeros(image_shape, np.float32)
    out = np.asarray(de.apply_candidate(jnp.asarray(image), jnp.asarray(candidate)))
    expected = image.copy()
    expected[height - 1, width - 1] = (1, 2, 3)
    expected[height - 1, 0] = (4, 5, 6)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(
        de.applied_pixels(candidate, image_shape),
        [[height - 1, width - 1, 1, 2, 3], [height - 1, 0, 4, 5, 6]],
    )


def test_round_rgb_false_writes_fractional_colours():
    candidate = jnp.array([2.7, 3.2, 100.4, 254.6, 300.0])
    image = jnp.zeros((5, 5, 3), jnp.float32)
    rounded = np.asarray(de.apply_candidate(image, candidate))[2, 3]
    exact = np.asarray(de.apply_candidate(image, candidate, round_rgb=False))[2, 3]
    np.testing.assert_array_equal(rounded, [100, 255, 255])
    np.testing.assert_allclose(exact, [100.4, 254.6, 255.0], rtol=1e-6)
    np.testing.assert_allclose(
        de.applied_pixels(np.asarray(candidate), (5, 5, 3), round_rgb=False)[0],
        [2, 3, 100.4, 254.6, 255.0], rtol=1e-6,
    )  # fmt: skip


@pytest.mark.parametrize("round_rgb", [True, False])
def test_applied_pixels_on_the_host_equal_apply_candidate_on_the_device(round_rgb):
    """Random candidates (out of bounds too, fractional, several pixels, a non-square
    image): the host's description of what was written is what the device wrote."""
    image_shape, num_pixels, count = (7, 11, 3), 3, 200
    rng = np.random.default_rng(0)
    candidates = rng.uniform(-20, 280, (count, 5 * num_pixels)).astype(np.float32)
    candidates[:, 0::5] = rng.uniform(-2, 9, (count, num_pixels))  # rows, partly outside
    candidates[:, 1::5] = rng.uniform(-2, 13, (count, num_pixels))  # columns
    images = rng.integers(0, 256, (count, *image_shape)).astype(np.float32)
    written = np.asarray(
        jax.vmap(functools.partial(de.apply_candidate, round_rgb=round_rgb))(
            jnp.asarray(images), jnp.asarray(candidates)
        )
    )
    pixels = de.applied_pixels(candidates, image_shape, round_rgb)  # [count, k, 5]
    assert pixels.shape == (count, num_pixels, 5)
    expected = images.copy()
    for i in range(count):
        for x, y, r, g, b in pixels[i]:  # later pixels win, as in a scatter of unique rows
            expected[i, int(x), int(y)] = (r, g, b)
    # Two pixels of one candidate on one position: the scatter keeps one of them, so
    # compare the others exactly and check that the shared one holds one of the colours.
    positions = pixels[..., :2].astype(int)
    for i in range(count):
        unique = {tuple(p) for p in positions[i]}
        if len(unique) == num_pixels:
            np.testing.assert_allclose(written[i], expected[i], rtol=1e-6)
    changed = np.any(written != images, axis=-1).sum((1, 2))
    assert np.all(changed <= num_pixels)
    assert (
        np.mean([len({tuple(p) for p in positions[i]}) == num_pixels for i in range(count)]) > 0.9
    )
