"""The DE engine on hand-built classifiers: known answers and invariants."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opa_jax import attack, de
from opa_jax.errors import InputError
from opa_jax.models import LoadedModel

TARGET_ROW, TARGET_COL = 5, 7


def red_pixel_logits(params, images):
    """Class 1 iff pixel (5, 7) has red > 200; class 2 iff pixel (1, 1) has blue > 220."""
    del params
    red = images[:, TARGET_ROW, TARGET_COL, 0]
    blue = images[:, 1, 1, 2]
    logit0 = jnp.zeros_like(red)
    return jnp.stack([logit0, 0.2 * (red - 200.0), 0.2 * (blue - 220.0)], axis=-1)


def only_red_pixel_logits(params, images):
    """Class 1 iff pixel (5, 7) has red > 200; nothing else changes the label."""
    logits = red_pixel_logits(params, images)
    return logits.at[:, 2].set(-100.0)


def toy_model(fn=red_pixel_logits):
    return LoadedModel("toy", fn, {}, (8, 8, 3), 3)


def grey_images(n):
    return np.full((n, 8, 8, 3), 100, np.uint8)


SMALL = de.DEConfig(num_pixels=1, popsize=64, generations=40)


def test_known_answer_finds_the_flipping_pixel():
    result = attack.attack_arrays(
        jax.random.key(0), toy_model(only_red_pixel_logits), grey_images(4), np.zeros(4), SMALL,
        num_slots=2, chunk_size=2,
    )  # fmt: skip
    assert result.success.all()
    np.testing.assert_array_equal(result.perturbation[:, 0, 0], TARGET_ROW)
    np.testing.assert_array_equal(result.perturbation[:, 0, 1], TARGET_COL)
    assert (result.perturbation[:, 0, 2] > 200).all()
    np.testing.assert_array_equal(result.adv_label, 1)
    # The threshold rule stops early: p(true) < 0.05 long before the budget.
    assert (result.generations < SMALL.generations).all()
    np.testing.assert_array_equal(result.queries, SMALL.popsize * (result.generations + 1))


def test_targeted_known_answer():
    config = SMALL
    result = attack.attack_arrays(
        jax.random.key(1), toy_model(), grey_images(3), np.zeros(3), config,
        target_labels=np.full(3, 2), num_slots=2, chunk_size=2,
    )  # fmt: skip
    assert result.success.all()
    np.testing.assert_array_equal(result.adv_label, 2)
    assert (result.adv_prob > config.targeted_threshold).all()
    np.testing.assert_array_equal(result.perturbation[:, 0, :2], np.ones((3, 2)))


@pytest.mark.parametrize("preset", ["paper", "scipy", "random"])
def test_candidates_stay_in_bounds(preset):
    config = de.DEConfig.from_preset(preset, num_pixels=3, popsize=50)
    low, high = de.bounds((32, 20, 3), 3)
    key = jax.random.key(0)
    population = de.init_population(key, config, low, high)
    assert population.shape == (50, 15)
    for g in range(5):
        assert bool(jnp.all((population >= low) & (population <= high)))
        fitness = jax.random.uniform(jax.random.fold_in(key, 100 + g), (50,))
        # Large F pushes mutants far out of bounds, so the bounds handling is exercised.
        wild = de.DEConfig.from_preset(preset, num_pixels=3, popsize=50, mutation=3.0)
        population = de.mutate(jax.random.fold_in(key, g), population, fitness, wild, low, high)


def test_latin_hypercube_has_one_sample_per_stratum():
    config = de.DEConfig.from_preset("scipy", popsize=40)
    low, high = de.bounds((40, 40, 3), 1)
    population = de.init_population(jax.random.key(3), config, low, high)
    strata = np.floor(np.asarray((population - low) / (high - low)) * 40).astype(int)
    for gene in range(5):
        assert sorted(strata[:, gene]) == list(range(40))


def test_paper_init_colours_are_normal_around_128():
    config = de.DEConfig(popsize=4000)
    low, high = de.bounds((32, 32, 3), 1)
    population = np.asarray(de.init_population(jax.random.key(0), config, low, high))
    colours = population[:, 2:]
    inside = colours[(colours > 0) & (colours < 255)]
    assert abs(np.median(inside) - 128) < 8
    assert 0.15 < np.mean(colours == 0) < 0.2  # P(N(128, 127) < 0) ~ 0.157
    assert abs(population[:, 0].mean() - 16) < 1 and population[:, 0].max() < 32


def test_mutation_partners_are_distinct_and_not_self():
    counts = np.zeros((6, 6), int)
    for k in range(300):
        picks = np.asarray(de._distinct_others(jax.random.key(k), 6, 3))  # [6, 3]
        for member, row in enumerate(picks):
            assert len(set(row.tolist()) | {member}) == 4
            assert ((row >= 0) & (row < 6)).all()
            counts[member, row] += 1
    # Uniform over the other members: each picked about 300 * 3 / 5 = 180 times.
    off_diagonal = counts[~np.eye(6, dtype=bool)]
    assert np.all(np.diag(counts) == 0) and off_diagonal.min() > 130 and off_diagonal.max() < 230


def test_best_fitness_never_worsens_and_parents_only_improve():
    model = toy_model()
    config = de.DEConfig(num_pixels=1, popsize=32, generations=100, stop="none")
    low, high = de.bounds(model.image_shape, 1)
    image = jnp.full((8, 8, 3), 100.0)
    state = de.empty_image_state(config, 3)
    key = jax.random.key(7)
    fresh = True
    bests, fitnesses = [], []
    for _ in range(15):
        candidates = de.propose(key, state, fresh, config, low, high)
        perturbed = jax.vmap(de.apply_candidate, (None, 0))(image, candidates)
        probs = jax.nn.softmax(model.apply_fn({}, perturbed))
        state = de.update(state, fresh, candidates, probs, 0, -1, config, False)
        fresh = False
        bests.append(float(state.best_fitness))
        fitnesses.append(np.asarray(state.fitness))
        assert bool(jnp.all((state.population >= low) & (state.population <= high)))
    assert all(b2 <= b1 for b1, b2 in zip(bests, bests[1:], strict=False))
    assert all((f2 <= f1).all() for f1, f2 in zip(fitnesses, fitnesses[1:], strict=False))
    assert int(state.generation) == 14


def test_same_seed_same_results_and_seed_matters():
    images = grey_images(5)
    run = lambda seed: attack.attack_arrays(
        jax.random.key(seed), toy_model(), images, np.zeros(5), SMALL, num_slots=2, chunk_size=2
    )
    a, b, c = run(0), run(0), run(1)
    np.testing.assert_array_equal(a.perturbation, b.perturbation)
    np.testing.assert_array_equal(a.queries, b.queries)
    assert not np.array_equal(a.perturbation, c.perturbation)


def test_batched_run_equals_per_image_runs():
    """An image's result depends on its dataset index only, not on the batch or slots."""
    images = grey_images(5)
    indices = np.array([11, 3, 42, 7, 19])
    batched = attack.attack_arrays(
        jax.random.key(0), toy_model(), images, np.zeros(5), SMALL,
        indices=indices, num_slots=2, chunk_size=2,
    )  # fmt: skip
    for i, index in enumerate(indices):
        alone = attack.attack_arrays(
            jax.random.key(0), toy_model(), images[i : i + 1], np.zeros(1), SMALL,
            indices=[index], num_slots=1, chunk_size=1,
        )  # fmt: skip
        np.testing.assert_array_equal(alone.perturbation[0], batched.perturbation[i])
        assert alone.queries[0] == batched.queries[i]
        assert alone.success[0] == batched.success[i]


def test_loop_traces_once_across_chunks():
    @chex.assert_max_traces(n=1)
    def traced_once(params, images):
        return red_pixel_logits(params, images)

    model = toy_model(traced_once)
    for seed in range(2):  # a second run reuses the compiled loop
        result = attack.attack_arrays(
            jax.random.key(seed), model, grey_images(7), np.zeros(7), SMALL, num_slots=2,
            chunk_size=2,
        )  # fmt: skip
        assert len(result.success) == 7


def test_refilled_slots_keep_evaluations_on_active_images():
    """With finish times varying widely, slots are refilled and nearly all work is useful."""
    model = toy_model()
    n = 100
    images = grey_images(n)
    images[::2, TARGET_ROW, TARGET_COL] = (199, 0, 0)  # one step from flipping: finish fast
    attacker = attack.Attacker(model, de.DEConfig(popsize=16, generations=30), False, 4)
    items = attack.WorkItems(
        np.arange(n), np.arange(n), np.zeros(n, np.int32), np.full(n, -1, np.int32)
    )
    progress = attack.LoopCounters()
    results = list(attacker.run(jax.random.key(0), items, lambda p: images[p], 16, progress))
    generations = np.concatenate([r.generations for r in results])
    assert generations.min() <= 1 and generations.max() >= 20  # finish times vary widely
    share = progress.active_evaluations / progress.evaluations
    assert share > 0.9, share
    # One set of results per device call, each call timed.
    assert progress.device_calls == len(results) and progress.device_seconds > 0


def nan_weight_model():
    """Logits from a weight that is NaN at run time (a parameter, so XLA cannot fold it)."""

    def logits(params, images):
        return images.mean(axis=(1, 2)) @ params["w"]  # [N, 3] @ [3, 3]

    weight = np.eye(3, dtype=np.float32)
    weight[1, 2] = np.nan
    return LoadedModel("nan_weight", logits, {"w": weight}, (8, 8, 3), 3)


def log_of_bright_red(params, images):
    """Finite on the grey images; NaN for a candidate that sets any red above 200."""
    del params
    headroom = 200.0 - images[..., 0].max(axis=(1, 2))  # [N], < 0 once red > 200
    logit = jnp.log(headroom)
    return jnp.stack([logit, jnp.zeros_like(logit), jnp.zeros_like(logit)], axis=-1)


def test_nan_logits_during_the_attack_are_a_clear_error():
    model = toy_model(log_of_bright_red)
    clean = attack.predict_probs(model, grey_images(2))  # the clean images are fine
    assert np.all(np.isfinite(clean))
    with pytest.raises(InputError, match="model toy returned NaN"):
        attack.attack_arrays(
            jax.random.key(0), model, grey_images(2), np.zeros(2), SMALL,
            num_slots=2, chunk_size=2,
        )  # fmt: skip


def test_nan_weight_is_a_clear_error_in_every_pass():
    model = nan_weight_model()
    with pytest.raises(InputError, match="model nan_weight returned NaN .* on clean images"):
        attack.predict_probs(model, grey_images(2))
    with pytest.raises(InputError, match="model nan_weight returned NaN"):
        attack.attack_arrays(
            jax.random.key(0), model, grey_images(2), np.zeros(2), SMALL,
            num_slots=2, chunk_size=2,
        )  # fmt: skip


def test_bad_de_settings_are_named():
    with pytest.raises(InputError, match="de.strategy"):
        de.DEConfig(strategy="best2")
    with pytest.raises(InputError, match="de.preset"):
        de.DEConfig.from_preset("sciypy")
    with pytest.raises(InputError, match="slots"):
        attack.Attacker(toy_model(), SMALL, False, 0)


def test_engine_queue_capacity_holds_every_finisher():
    """Every item of a queue comes back exactly once, whatever slots and chunk size."""
    for slots, chunk in [(1, 1), (2, 2)]:  # shapes the other tests compiled already
        result = attack.attack_arrays(
            jax.random.key(0), toy_model(), grey_images(9), np.zeros(9), SMALL,
            num_slots=slots, chunk_size=chunk,
        )  # fmt: skip
        assert len(result.work_ids) == 9
        np.testing.assert_array_equal(np.sort(result.work_ids), np.arange(9))
        np.testing.assert_array_equal(result.queries, SMALL.popsize * (result.generations + 1))
