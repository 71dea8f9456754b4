"""What the attack achieves, through the engine: on toys built so that each rule shows,
and on the real Keras LeNet with pinned results.

Every engine run here is checked against something computed apart from it: a
random-search baseline at the same budget, the DE steps replayed one generation
at a time on the host, or the recorded pixels written into the image by hand.
"""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import realdata
from replay import expected_success, model_probs, write_perturbation

from opa_jax import attack, data, de, engine, run
from opa_jax import workdir as workdir_lib
from opa_jax.models import LoadedModel, load_model

sys.path.insert(0, str(realdata.REPO))  # for `configs`, as scripts/attack.py does
from configs import lenet  # noqa: E402

# ---------------------------------------------------------------------------
# A needle in five dimensions: random sampling almost never finds it, DE does.

SPHERE_SHAPE = (32, 32, 3)
# (row, column, r, g, b) of the target, each scaled to [0, 1]; far from the grey image.
SPHERE_TARGET = np.array([0.7, 0.3, 200 / 255, 60 / 255, 150 / 255], np.float32)
SPHERE_RADIUS = 0.08


def sphere_logits(params, images):
    """Class 1 iff some pixel lies within SPHERE_RADIUS of the target in (position,
    colour) space. The logit falls with the log of the distance, so p(true) keeps a
    slope everywhere (no flat, saturated region) and a search can follow it."""
    del params
    height, width = images.shape[1:3]
    rows = (jnp.arange(height) + 0.5) / height - SPHERE_TARGET[0]
    cols = (jnp.arange(width) + 0.5) / width - SPHERE_TARGET[1]
    distance2 = (rows[:, None] ** 2 + cols[None, :] ** 2)[None]  # [1, H, W]
    distance2 = distance2 + jnp.sum((images / 255.0 - SPHERE_TARGET[2:]) ** 2, -1)  # [N, H, W]
    closest = jnp.sqrt(jnp.min(distance2, axis=(1, 2)) + 1e-12)  # [N]
    logit = -4.0 * jnp.log(closest / SPHERE_RADIUS)
    return jnp.stack([jnp.zeros_like(logit), logit], axis=-1)


SPHERE = LoadedModel("sphere", sphere_logits, {}, SPHERE_SHAPE, 2)
SPHERE_IMAGES = 16
SPHERE_BUDGET = dict(popsize=40, generations=30)


@functools.cache
def sphere_run(preset: str):
    """The preset on 16 grey images (streams differ by dataset index), equal budgets.
    Cached: several tests read the same runs."""
    config = de.DEConfig.from_preset(preset, **SPHERE_BUDGET)
    images = np.full((SPHERE_IMAGES, *SPHERE_SHAPE), 100, np.uint8)
    result = attack.attack_arrays(
        jax.random.key(0), SPHERE, images, np.zeros(SPHERE_IMAGES), config, num_slots=8
    )
    return config, images, result


@pytest.mark.slow  # three engine compilations (paper, scipy, random) between the two
@pytest.mark.parametrize("preset", ["paper", "scipy"])
def test_de_beats_random_search_at_an_equal_budget(preset):
    """rand/1 (paper) and best1 (scipy) find the ball on every image; random search with
    the same population and generations finds it on at most 2 of 16."""
    _, _, found = sphere_run(preset)
    random_config, _, sampled = sphere_run("random")
    assert found.success.sum() == SPHERE_IMAGES, found.success
    assert sampled.success.sum() <= 2, sampled.success
    # Equal budgets: random search ran to the end on each image it did not solve.
    budget = random_config.popsize * (random_config.generations + 1)
    assert np.all(sampled.queries[~sampled.success] == budget)
    assert np.all(found.queries <= budget)
    # The recorded pixels lie in the ball (distance computed here, apart from the model).
    pixels = found.perturbation[:, 0]  # [16, 5]
    position = (pixels[:, :2] + 0.5) / np.array(SPHERE_SHAPE[:2])
    point = np.concatenate([position, pixels[:, 2:] / 255.0], axis=1)
    assert np.all(np.linalg.norm(point - SPHERE_TARGET, axis=1) < SPHERE_RADIUS), pixels


# ---------------------------------------------------------------------------
# The stop rules, checked against the DE steps replayed on the host.


@functools.cache
def replay_step(apply_fn, image_shape, config, targeted):
    """One DE generation for one image, as the engine runs it, compiled once per setting."""
    low, high = de.bounds(image_shape, config.num_pixels)
    write = jax.vmap(functools.partial(de.apply_candidate, round_rgb=config.round_rgb), (None, 0))

    @jax.jit
    def step(params, key, image, state, fresh, true_label, target_label):
        candidates = de.propose(key, state, fresh, config, low, high)
        logits = apply_fn(params, write(image, candidates))
        probs = jax.nn.softmax(logits.astype(jnp.float32))
        state = de.update(state, fresh, candidates, probs, true_label, target_label, config,
                          targeted)  # fmt: skip
        return state, probs

    return step


def replayed_stop_generation(key, model, image, true_label, target_label, index, config,
                             reached):  # fmt: skip
    """The first generation at which `reached(probs)` holds for some candidate, running
    de.propose/de.update for one image with the engine's per-image key; None if never."""
    step = replay_step(model.apply_fn, model.image_shape, config, target_label >= 0)
    image_key = engine.image_key(key, index, target_label)
    image = jnp.asarray(image, jnp.float32)
    state = de.empty_image_state(config, model.num_classes)
    for generation in range(config.generations + 1):
        fresh = generation == 0
        state, probs = step(model.params, image_key, image, state, fresh, true_label, target_label)
        if reached(np.asarray(probs)):
            return generation
    return None


@pytest.mark.parametrize("preset", ["paper", "scipy"])
def test_nontargeted_stop_rules_end_at_the_first_generation_that_meets_them(preset):
    """paper: stop once some candidate has p(true) < 0.05; scipy: once some candidate's
    argmax is wrong, even with p(true) well above 0.05."""
    config, images, result = sphere_run(preset)
    reached = {
        "paper": lambda probs: np.any(probs[:, 0] < config.nontargeted_threshold),
        "scipy": lambda probs: np.any(probs.argmax(-1) != 0),
    }[preset]
    for i in range(SPHERE_IMAGES):
        want = replayed_stop_generation(
            jax.random.key(0), SPHERE, images[i], 0, -1, i, config, reached
        )
        assert result.generations[i] == want, (i, result.generations[i], want)
    assert np.all(result.generations < config.generations)
    np.testing.assert_array_equal(result.queries, config.popsize * (result.generations + 1))
    p_true = result.adv_probs[:, 0]
    if preset == "scipy":  # the argmax stop came before the paper's threshold would have
        assert np.median(p_true) > 0.1, p_true
    else:
        assert np.all(p_true < config.nontargeted_threshold)


def blue_pixel_logits(params, images):
    """Three classes: class 1 iff pixel (5, 7) has red > 200; class 2 iff pixel (1, 1)
    has blue > 220."""
    del params
    red, blue = images[:, 5, 7, 0], images[:, 1, 1, 2]
    return jnp.stack([jnp.zeros_like(red), 0.2 * (red - 200.0), 0.2 * (blue - 220.0)], axis=-1)


BLUE_PIXEL = LoadedModel("blue_pixel", blue_pixel_logits, {}, (8, 8, 3), 3)


def test_targeted_threshold_stops_before_the_budget():
    """p(target) > 0.9 ends the image at the first generation reaching it, long before
    the budget; queries count the initial population and every generation."""
    config = de.DEConfig(popsize=32, generations=40)
    images = np.full((6, 8, 8, 3), 100, np.uint8)
    result = attack.attack_arrays(
        jax.random.key(3), BLUE_PIXEL, images, np.zeros(6), config,
        target_labels=np.full(6, 2), num_slots=3,
    )  # fmt: skip
    assert result.success.all()
    assert np.all(result.generations < config.generations), result.generations
    np.testing.assert_array_equal(result.queries, config.popsize * (result.generations + 1))
    assert np.all(result.adv_probs[:, 2] > config.targeted_threshold)
    for i in range(6):
        want = replayed_stop_generation(
            jax.random.key(3), BLUE_PIXEL, images[i], 0, 2, i, config,
            lambda probs: np.any(probs[:, 2] > config.targeted_threshold),
        )  # fmt: skip
        assert result.generations[i] == want, (i, result.generations[i], want)


# ---------------------------------------------------------------------------
# Several pixels, and the less common settings, end to end.


def red_count_logits(params, images, num_pixels):
    """Class 1 once `num_pixels` distinct pixels are red (red > 180, green < 120); graded
    by how red each pixel is, so the search has a slope to follow."""
    del params
    red, green = images[..., 0], images[..., 1]
    redness = jax.nn.sigmoid((red - 180.0) / 10.0) * jax.nn.sigmoid((120.0 - green) / 10.0)
    count = jnp.sum(redness, axis=(1, 2))  # [N]
    logit = 4.0 * (count - (num_pixels - 0.5))
    return jnp.stack([jnp.zeros_like(logit), logit], axis=-1)


@pytest.mark.parametrize("num_pixels", [3, 5])
def test_several_pixels_through_the_engine(num_pixels):
    """k red pixels at k distinct places are needed: every image succeeds, the recorded
    pixels are k distinct red ones, and writing them into the image by hand gives the
    recorded probabilities (which checks the gene layout: pixel j is genes 5j..5j+4)."""
    model = LoadedModel(
        f"red_count{num_pixels}", functools.partial(red_count_logits, num_pixels=num_pixels),
        {}, (16, 16, 3), 2,
    )  # fmt: skip
    config = de.DEConfig.from_preset("scipy", num_pixels=num_pixels, popsize=40, generations=40)
    images = np.full((8, 16, 16, 3), 100, np.uint8)
    result = attack.attack_arrays(
        jax.random.key(0), model, images, np.zeros(8), config, num_slots=8
    )
    assert result.success.all(), result.generations
    assert result.perturbation.shape == (8, num_pixels, 5)
    for i, pixels in enumerate(result.perturbation):
        assert len({(x, y) for x, y in pixels[:, :2]}) == num_pixels, pixels
        assert np.mean(pixels[:, 2]) > 180 and np.mean(pixels[:, 3]) < 120, pixels
        probs = model_probs(model, write_perturbation(images[i], pixels)[None])[0]
        # A sum of 256 float32 sigmoids, batched or not: rounding moves it by ~1e-5; a
        # pixel in the wrong genes moves the red count by ~1, p(1) by ~0.2 or more.
        np.testing.assert_allclose(probs, result.adv_probs[i], atol=1e-4)


def test_crossover_unrounded_colours_and_a_non_square_image_end_to_end():
    """6 x 10 images; the flipping pixel is at row 4, column 8, which only exists with
    rows bounded by the height and columns by the width. Crossover 0.5 and unrounded
    colours: the records keep fractional colours, and replaying them gives the
    recorded probabilities."""

    def logits(params, images):
        del params
        red = images[:, 4, 8, 0]
        return jnp.stack([jnp.zeros_like(red), 0.2 * (red - 200.0)], axis=-1)

    model = LoadedModel("corner_pixel", logits, {}, (6, 10, 3), 2)
    config = de.DEConfig(popsize=32, generations=60, crossover=0.5, round_rgb=False)
    images = np.full((6, 6, 10, 3), 100, np.uint8)
    result = attack.attack_arrays(jax.random.key(0), model, images, np.zeros(6), config,
                                  num_slots=3)  # fmt: skip
    assert result.success.all(), result.generations
    np.testing.assert_array_equal(result.perturbation[:, 0, :2], np.tile([4, 8], (6, 1)))
    colours = result.perturbation[:, 0, 2:]
    assert np.mean(colours != np.round(colours)) > 0.5, colours  # not rounded to integers
    for i in range(6):
        probs = model_probs(model, write_perturbation(images[i], result.perturbation[i])[None])
        np.testing.assert_allclose(probs[0], result.adv_probs[i], atol=1e-6)


# ---------------------------------------------------------------------------
# The real Keras LeNet on the exact CIFAR-10 test images.

# The first 32 correctly classified exact test images, 1 pixel, population 40 for 10
# generations, seed 0. Measured with 8 and with 32 slots (model batches of 320 and
# 1280): the records were identical, probabilities within 2e-7, so the outcome is
# pinned exactly. (successes, total queries over the 32 images)
LENET_PINNED = {"paper": (13, 13440), "scipy": (13, 9840), "random": (13, 13520)}
LENET_IMAGES, LENET_BUDGET = 32, dict(popsize=40, generations=10)


@pytest.fixture(scope="module")
def lenet_run(tmp_path_factory):
    """`lenet_run(preset)`: configs/lenet.py on the first 32 eligible exact images, run
    once per preset in this module; (summary, records)."""
    runs = {}

    def get(preset: str):
        realdata.require(realdata.LENET, realdata.CIFAR10_EXACT)
        if preset not in runs:
            config = lenet.get_config()
            config.model = f"keras:{realdata.LENET}"
            config.data = f"folder:{realdata.CIFAR10_EXACT}"
            config.num_images = LENET_IMAGES
            config.de.preset = preset
            config.de.popsize = LENET_BUDGET["popsize"]
            config.de.generations = LENET_BUDGET["generations"]
            config.slots = 8
            workdir = str(tmp_path_factory.mktemp(f"lenet_{preset}"))
            summary = run.run_attack(config, workdir)
            runs[preset] = summary, workdir_lib.read_all_results(workdir)
        return runs[preset]

    return get


@pytest.mark.realdata
@pytest.mark.parametrize("preset", ["paper", "scipy", "random"])
def test_lenet_outcome_is_pinned_for_each_preset(preset, lenet_run):
    summary, records = lenet_run(preset)
    assert len(records) == summary["attacks"] == LENET_IMAGES
    assert all(r["true_label"] == np.argmax(r["clean_probs"]) for r in records)  # only_correct
    successes, queries = LENET_PINNED[preset]
    assert (summary["successes"], sum(r["queries"] for r in records)) == (successes, queries)


@pytest.mark.realdata
def test_lenet_records_replay_on_the_model(lenet_run):
    """The paper preset's records on LeNet: the recorded pixel, written into the exact
    test image, gives the recorded probabilities; success follows the engine's rule."""
    _, records = lenet_run("paper")
    model = load_model(f"keras:{realdata.LENET}")
    dataset = data.load_dataset(f"folder:{realdata.CIFAR10_EXACT}", "test", model.image_shape)
    positions = {int(index): p for p, index in enumerate(dataset.indices)}
    clean = dataset.read([positions[r["image"]] for r in records])
    adversarial = np.stack([write_perturbation(image, r["perturbation"])
                            for image, r in zip(clean, records, strict=True)])  # fmt: skip
    probs = model_probs(model, adversarial)
    np.testing.assert_allclose(probs, [r["adv_probs"] for r in records], atol=1e-5)
    np.testing.assert_allclose(model_probs(model, clean), [r["clean_probs"] for r in records],
                               atol=1e-5)  # fmt: skip
    for p, record in zip(probs, records, strict=True):
        assert record["success"] == expected_success(p, record["true_label"], None)
        assert record["adv_label"] == int(np.argmax(p))
