"""Whole runs' records replayed on the model, and which images a run attacks.

The tiny setup is the one of test_run.py (a Keras-format conv net on 8 x 8
images), but three of its sixteen images carry a label the model gets wrong,
so `only_correct` has something to leave out.
"""

import numpy as np
import pytest
from replay import expected_success, fgsm_reference, model_probs, write_perturbation
from test_run import tiny_config, write_images, write_tiny_keras

from opa_jax import attack, plan, run
from opa_jax import workdir as workdir_lib
from opa_jax.models import load_model

NUM_IMAGES = 16
MISLABELLED = (1, 4, 5)  # dataset indices whose label is not the model's prediction
POPSIZE, GENERATIONS = 16, 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("records")
    model_spec = f"keras:{write_tiny_keras(root / 'tiny.h5')}"
    model = load_model(model_spec)
    images = np.random.default_rng(1).integers(0, 256, (NUM_IMAGES, 8, 8, 3), np.uint8)
    labels = attack.predict_probs(model, images).argmax(-1)
    labels[list(MISLABELLED)] = (labels[list(MISLABELLED)] + 1) % 10
    write_images(root / "data", images, labels)
    return {
        "model": model_spec, "data": f"folder:{root / 'data'}", "root": root,
        "images": images, "labels": labels, "loaded": model,
    }  # fmt: skip


def config_for(tiny, **fields):
    return tiny_config(tiny, **{"de.popsize": POPSIZE, "de.generations": GENERATIONS, **fields})


def run_and_read(tiny, name, **fields):
    config = config_for(tiny, **fields)
    workdir = tiny["root"] / name
    summary = run.run_attack(config, str(workdir))
    return config, summary, workdir_lib.read_all_results(str(workdir))


# ---------------------------------------------------------------------------
# Which images: the first N eligible ones by dataset index.


def test_only_correct_takes_the_first_n_correctly_classified_images(tiny):
    correct = [i for i in range(NUM_IMAGES) if i not in MISLABELLED]
    for only_correct, num_images, want in [
        (True, 6, correct[:6]),  # [0, 2, 3, 6, 7, 8]: skips 1, 4 and 5
        (False, 6, list(range(6))),
        (True, 0, correct),  # 0 means every eligible image
        (True, 14, correct),  # more than there are: all 13
    ]:
        config = config_for(tiny, only_correct=only_correct, num_images=num_images)
        the_plan = plan.make_plan(config)
        assert the_plan.items.indices.tolist() == want, (only_correct, num_images)
        assert the_plan.eligible_images == len(want)
        np.testing.assert_array_equal(the_plan.items.true_labels, tiny["labels"][want])


# ---------------------------------------------------------------------------
# DE records.


@pytest.fixture(scope="module")
def de_runs(tiny):
    return {
        "nontargeted": run_and_read(tiny, "de", num_images=6),
        "targeted": run_and_read(
            tiny, "de_targeted", num_images=4, targeted=True, targets="2,6,7"
        ),  # fmt: skip
    }


@pytest.mark.slow  # two whole runs (non-targeted, targeted), each compiling its loop
@pytest.mark.parametrize("mode", ["nontargeted", "targeted"])
def test_de_records_replay_on_the_model(tiny, de_runs, mode):
    """Each record's pixel, written into the clean image by hand, gives its adv_probs;
    success, adv_label and adv_prob follow from them by the engine's rule; clean_probs
    are the model's on the clean image; the queries add up."""
    config, summary, records = de_runs[mode]
    model = tiny["loaded"]
    images = {int(i): image for i, image in enumerate(tiny["images"])}  # folder index = i
    expected_items = {
        "nontargeted": {(i, None) for i in (0, 2, 3, 6, 7, 8)},
        "targeted": {
            (i, t) for i in (0, 2, 3, 6) for t in (2, 6, 7) if t != tiny["labels"][i]
        },  # fmt: skip
    }[mode]
    assert {(r["image"], r["target_label"]) for r in records} == expected_items
    assert summary["attacks"] == len(records)
    clean = np.stack([images[r["image"]] for r in records])
    adversarial = np.stack([write_perturbation(images[r["image"]], r["perturbation"])
                            for r in records])  # fmt: skip
    replayed = model_probs(model, adversarial)
    np.testing.assert_allclose(replayed, [r["adv_probs"] for r in records], atol=2e-6)
    clean_probs = model_probs(model, clean)
    np.testing.assert_allclose(clean_probs, [r["clean_probs"] for r in records], atol=2e-6)
    for record, probs, clean_p in zip(records, replayed, clean_probs, strict=True):
        assert record["true_label"] == tiny["labels"][record["image"]]
        assert int(np.argmax(clean_p)) == record["true_label"]  # only_correct
        assert record["success"] == expected_success(probs, record["true_label"],
                                                     record["target_label"])  # fmt: skip
        assert record["adv_label"] == int(np.argmax(probs))
        assert record["adv_prob"] == pytest.approx(float(np.max(probs)), abs=2e-6)
        assert record["queries"] == POPSIZE * (record["generations"] + 1)
        assert 0 <= record["generations"] <= GENERATIONS
        assert len(record["perturbation"]) == 1 and record["pixels"] == 1
    # A mixed outcome, so that both sides of the success rule were checked.
    assert 0 < sum(r["success"] for r in records) < len(records)


# ---------------------------------------------------------------------------
# FGSM records.


def test_targeted_fgsm_records_replay_on_the_model(tiny):
    """Targeted FGSM descends the target's loss: the step, recomputed here for every
    record, gives the recorded probabilities, pixels changed and L-inf."""
    epsilon = 6.0
    _, summary, records = run_and_read(
        tiny, "fgsm_targeted", method="fgsm", targeted=True, targets="0,3", num_images=5,
        **{"fgsm.epsilon": epsilon},
    )  # fmt: skip
    model = tiny["loaded"]
    assert summary["attacks"] == len(records) >= 8
    for record in records:
        clean = tiny["images"][record["image"]]
        adversarial = fgsm_reference(model, clean, record["target_label"], True, epsilon)
        probs = model_probs(model, adversarial[None])[0]
        np.testing.assert_allclose(probs, record["adv_probs"], atol=2e-6)
        changed = np.abs(adversarial - clean.astype(np.float64))
        assert record["l0_pixels"] == int(np.sum(changed.max(-1) > 0))
        assert record["linf"] == float(changed.max())
        assert record["success"] == expected_success(probs, record["true_label"],
                                                     record["target_label"])  # fmt: skip
    assert any(r["success"] for r in records)


# ---------------------------------------------------------------------------
# bfloat16 forward passes through a whole run.


def test_bfloat16_run_uses_bfloat16_logits_with_the_float32_argmax(tiny):
    """With precision=bfloat16, the clean pass and the attack both see bfloat16 logits:
    they differ from float32 ones, the clean argmax agrees, and the records replay on
    the bfloat16 model (not on the float32 one)."""
    model32 = tiny["loaded"]
    model16 = model32.with_precision("bfloat16")
    images = tiny["images"].astype(np.float32)
    logits32 = np.asarray(model32.apply_fn(model32.params, images))
    logits16 = np.asarray(model16.apply_fn(model16.params, images))
    scale = np.abs(logits32).max()
    assert np.abs(logits16 - logits32).max() > 1e-3 * scale  # really bfloat16
    assert np.abs(logits16 - logits32).max() < 0.05 * scale  # and still the same model
    np.testing.assert_array_equal(logits16.argmax(-1), logits32.argmax(-1))

    _, summary, records = run_and_read(tiny, "bf16", num_images=6, precision="bfloat16")
    assert summary["attacks"] == 6
    clean = np.stack([tiny["images"][r["image"]] for r in records])
    recorded_clean = np.asarray([r["clean_probs"] for r in records])
    np.testing.assert_allclose(model_probs(model16, clean), recorded_clean, atol=2e-6)
    assert np.abs(model_probs(model32, clean) - recorded_clean).max() > 1e-4
    adversarial = np.stack([write_perturbation(tiny["images"][r["image"]], r["perturbation"])
                            for r in records])  # fmt: skip
    recorded = np.asarray([r["adv_probs"] for r in records])
    np.testing.assert_allclose(model_probs(model16, adversarial), recorded, atol=2e-6)
    assert np.abs(model_probs(model32, adversarial) - recorded).max() > 1e-4
