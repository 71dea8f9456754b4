"""FGSM on a linear classifier, whose gradient signs are known in closed form."""

import jax.numpy as jnp
import numpy as np
import pytest

from opa_jax import attack, baselines
from opa_jax.errors import InputError
from opa_jax.models import LoadedModel

SHAPE = (4, 5, 3)
# Class 1's logit is 0.01 * sum(WEIGHTS * x) - 5, class 0's is 0, class 2's is -50. The
# weights are zero on row 0, so FGSM must leave that row alone.
WEIGHTS = np.random.default_rng(0).choice([-1.0, 1.0], SHAPE).astype(np.float32)
WEIGHTS[0] = 0.0


def linear_logits(params, images):
    score = 0.01 * jnp.sum(images * params["w"], axis=(1, 2, 3)) - 5.0
    zeros = jnp.zeros_like(score)
    return jnp.stack([zeros, score, zeros - 50.0], axis=-1)


MODEL = LoadedModel("linear", linear_logits, {"w": jnp.asarray(WEIGHTS)}, SHAPE, 3)


def items(true_labels, target_labels):
    n = len(true_labels)
    return attack.WorkItems(
        np.arange(n), np.arange(n), np.asarray(true_labels, np.int32),
        np.asarray(target_labels, np.int32),
    )  # fmt: skip


def run_fgsm(images, true_labels, target_labels, epsilon, batch_size=4):
    batches = list(
        baselines.fgsm_results(
            MODEL, items(true_labels, target_labels), lambda p: images[p], epsilon, batch_size
        )
    )
    return batches


def expected_adversarial(images, epsilon):
    """Both attacks here raise class 1's logit: every pixel moves by epsilon along sign(w)."""
    moved = images.astype(np.float64) + epsilon * np.sign(WEIGHTS)
    return np.round(np.clip(moved, 0, 255))


def test_nontargeted_and_targeted_steps_match_the_closed_form():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, *SHAPE), dtype=np.uint8)
    images[0] = 128  # far from the clip bounds
    images[1, 1:] = 254  # the clip bounds cut the step short
    epsilon = 2.6  # not an integer: the adversarial image is rounded
    # True class 0, non-targeted: ascend -log p0, whose gradient is p1 * w.
    # True class 0, target 1: descend -log p1, whose gradient is -p0 * w. Same step.
    true_labels = [0, 0, 0, 0, 0]
    for target_labels in ([-1] * 5, [1] * 5):
        batches = run_fgsm(images, true_labels, target_labels, epsilon)
        assert [len(b.work_ids) for b in batches] == [4, 1]  # the last batch is padded
        result = attack.Results(*[np.concatenate([getattr(b, f) for b in batches])
                                  for f in ("work_ids", "success", "perturbation", "adv_probs",
                                            "generations", "queries")])  # fmt: skip
        l0 = np.concatenate([b.l0_pixels for b in batches])
        linf = np.concatenate([b.linf for b in batches])
        adversarial = expected_adversarial(images, epsilon)
        change = np.abs(adversarial - images)
        np.testing.assert_array_equal(result.work_ids, np.arange(5))
        np.testing.assert_array_equal(l0, np.any(change > 0, -1).sum((1, 2)))
        np.testing.assert_array_equal(linf, change.max((1, 2, 3)))
        assert l0[0] == 3 * 5 and linf[0] == 3.0  # rows 1-3 move, by round(2.6) = 3
        scores = 0.01 * (adversarial * WEIGHTS).sum((1, 2, 3)) - 5.0
        logits = np.stack([np.zeros(5), scores, np.full(5, -50.0)], -1)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        np.testing.assert_allclose(result.adv_probs, probs, atol=1e-6)
        np.testing.assert_array_equal(result.success, probs.argmax(-1) == 1)
        assert result.perturbation.shape == (5, 0, 5)
        np.testing.assert_array_equal(result.queries, 1)


def test_success_is_judged_by_the_mode():
    # Class 0 on top (p1 ~ 0.06), so no gradient underflows; a full-range step then
    # decides the label: towards class 1, or (descending the loss of class 2, which
    # only class 1 competes with) away from it, leaving class 0.
    images = np.where(WEIGHTS > 0, 10, 0).astype(np.uint8)[None].repeat(3, 0)
    assert np.asarray(linear_logits(MODEL.params, images)).argmax(-1).tolist() == [0, 0, 0]
    (result,) = run_fgsm(images, [0, 0, 0], [-1, 1, 2], 255.0)
    assert result.adv_label.tolist() == [1, 1, 0]
    # Non-targeted: label changed; targeted at 1: reached; targeted at 2: not reached.
    assert result.success.tolist() == [True, True, False]


def test_bad_epsilon_and_image_shape_are_named():
    images = np.zeros((2, *SHAPE), np.uint8)
    with pytest.raises(InputError, match="fgsm.epsilon"):
        run_fgsm(images, [0, 0], [-1, -1], 0.0)
    wrong = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(InputError, match="expects"):
        run_fgsm(wrong, [0, 0], [-1, -1], 4.0)


def test_nan_logits_in_fgsm_are_a_clear_error():
    """NaN made at run time: a NaN weight, and a log that only the stepped image makes NaN."""
    images = np.full((2, *SHAPE), 100, np.uint8)
    weights = WEIGHTS.copy()
    weights[1, 1, 1] = np.nan
    nan_weight = LoadedModel("nan_weight", linear_logits, {"w": jnp.asarray(weights)}, SHAPE, 3)

    def log_of_bright(params, images):  # finite at 100, NaN once FGSM lifts a pixel past 200
        headroom = jnp.log(200.0 - images.max(axis=(1, 2, 3)))
        return linear_logits(params, images).at[:, 0].set(headroom)

    bright = LoadedModel("bright", log_of_bright, {"w": jnp.asarray(WEIGHTS)}, SHAPE, 3)
    assert np.all(np.isfinite(attack.predict_probs(bright, images)))
    for model in (nan_weight, bright):
        with pytest.raises(InputError, match=f"model {model.name} returned NaN .* during FGSM"):
            list(
                baselines.fgsm_results(
                    model, items([0, 0], [-1, -1]), lambda p: images[p], 150.0, batch_size=4
                )
            )
