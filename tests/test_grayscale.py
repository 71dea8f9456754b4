"""Grayscale (and other channel counts): models and data of shape H x W x 1 end to end.

A pixel of a C-channel image is (x, y, v_1, ..., v_C): for grayscale (x, y, v).
The setup is synthetic: LeNet-5 (`random:lenet5`, 28 x 28 x 1, seed-0 weights)
and a folder of grayscale PNGs labelled by its predictions, three of them wrong.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from test_incremental import assert_matches_full
from test_run import load_config_file, tiny_config, write_images, write_tiny_keras

from opa_jax import attack, data, de, exhaustive, export, plan, report, results, run
from opa_jax import workdir as workdir_lib
from opa_jax.errors import InputError
from opa_jax.models import base, load_model, zoo

SHAPE = (28, 28, 1)
NUM_IMAGES = 12
MISLABELLED = (2, 5, 7)
POPSIZE, GENERATIONS = 16, 8


def write_gray_images(root, images, labels, num_classes=10, split="test"):
    """`root/<split>/class<label>/<index>.png` as grayscale ('L') PNGs."""
    for label in range(num_classes):
        (root / split / f"class{label}").mkdir(parents=True, exist_ok=True)
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image[..., 0], "L").save(
            root / split / f"class{label}" / f"{index:05d}.png"
        )
    return root


@pytest.fixture(scope="module")
def gray(tmp_path_factory):
    root = tmp_path_factory.mktemp("gray")
    model = load_model("random:lenet5")
    images = np.random.default_rng(0).integers(0, 256, (NUM_IMAGES, *SHAPE), np.uint8)
    labels = attack.predict_probs(model, images).argmax(-1)
    labels[list(MISLABELLED)] = (labels[list(MISLABELLED)] + 1) % 10
    write_gray_images(root / "data", images, labels)
    return {"model": "random:lenet5", "data": f"folder:{root / 'data'}", "root": root,
            "images": images, "labels": labels, "loaded": model}  # fmt: skip


def gray_config(gray, **fields):
    return tiny_config(gray, **{"de.popsize": POPSIZE, "de.generations": GENERATIONS, **fields})


def write_pixels(image: np.ndarray, perturbation) -> np.ndarray:
    """The clean image [H, W, C] with each (x, y, v_1..v_C) written at row x, column y."""
    out = np.array(image, np.float32)
    for x, y, *values in perturbation:
        assert x == int(x) and y == int(y) and len(values) == image.shape[-1]
        out[int(x), int(y)] = values
    return out


def model_probs(model, images) -> np.ndarray:
    logits = jax.jit(model.apply_fn)(model.params, jnp.asarray(images, jnp.float32))
    return np.asarray(jax.nn.softmax(logits, axis=-1))


# ---------------------------------------------------------------------------
# Data: grayscale folders and tfds datasets read as [N, H, W, 1].


def test_a_grayscale_folder_reads_as_one_channel_and_refuses_an_rgb_model(gray):
    dataset = data.load_dataset(gray["data"], "test", SHAPE)
    images = dataset.read(range(NUM_IMAGES))
    assert images.shape == (NUM_IMAGES, *SHAPE) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, gray["images"])  # lossless, pixel for pixel
    np.testing.assert_array_equal(dataset.labels, gray["labels"])
    with pytest.raises(InputError, match=r"1 channel \(grayscale\).*expects 3 channels \(RGB\)"):
        data.load_dataset(gray["data"], "test", (28, 28, 3))


def test_an_rgb_folder_refuses_a_grayscale_model(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (2, 28, 28, 3), np.uint8)
    write_images(tmp_path / "rgb", images, [0, 1], num_classes=2)
    with pytest.raises(InputError, match=r"3 channels \(RGB\).*expects 1 channel \(grayscale\)"):
        data.load_dataset(f"folder:{tmp_path / 'rgb'}", "test", SHAPE)


def test_a_run_refuses_data_whose_channels_are_not_the_models(gray, tmp_path):
    """An RGB model on grayscale data: the message names both channel counts."""
    rgb_model = f"keras:{write_tiny_keras(tmp_path / 'rgb.h5', size=28)}"
    config = gray_config({**gray, "model": rgb_model})
    with pytest.raises(InputError, match=r"has images of 1 channel .* expects 3 channels"):
        plan.make_plan(config)


class TfdsTinyDigits(tfds.core.GeneratorBasedBuilder):
    """A real tfds builder of MNIST's features (28 x 28 x 1 images), prepared as
    ArrayRecord on disk with PIL (no TensorFlow, no network)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(28, 28, 1)),
                "label": tfds.features.ClassLabel(num_classes=10),
            }
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples()}

    def _generate_examples(self):
        for value in range(6):
            image = np.zeros((28, 28), np.uint8)
            image[value, :] = 40 * value + 1  # one bright row, at row `value`
            yield value, {"image": Image.fromarray(image, "L"), "label": value}


def test_tfds_grayscale_dataset_reads_as_one_channel(tmp_path):
    TfdsTinyDigits(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    dataset = data.load_dataset("tfds:tfds_tiny_digits", "test", SHAPE, data_dir=str(tmp_path))
    images = dataset.read(range(6))
    assert images.shape == (6, *SHAPE) and images.dtype == np.uint8
    for image, label in zip(images, dataset.labels, strict=True):  # decoded exactly
        assert image[label, :, 0].tolist() == [40 * label + 1] * 28
        assert np.count_nonzero(image) == 28
    resized = data.load_dataset(
        "tfds:tfds_tiny_digits", "test", (14, 14, 1), "center_crop", data_dir=str(tmp_path)
    )
    assert resized.read([0]).shape == (1, 14, 14, 1)
    with pytest.raises(InputError, match=r"tfds:tfds_tiny_digits has images of 1 channel"):
        data.load_dataset("tfds:tfds_tiny_digits", "test", (28, 28, 3), data_dir=str(tmp_path))


# ---------------------------------------------------------------------------
# The candidate: (x, y, v) for one channel, and C values for C channels.


def test_de_draws_x_y_and_one_value_per_channel():
    for channels in (1, 2, 4):
        config = de.DEConfig.from_preset("paper", num_pixels=2, popsize=4000, channels=channels)
        genes = de.pixel_genes(channels)
        assert config.num_genes == 2 * genes
        low, high = de.bounds((28, 20, channels), 2)
        assert high.tolist() == [28, 20, *[255.0] * channels] * 2
        population = np.asarray(de.init_population(jax.random.key(0), config, low, high))
        pixels = population.reshape(4000, 2, genes)
        rows, cols, values = pixels[..., 0], pixels[..., 1], pixels[..., 2:]
        assert rows.max() <= 28 and cols.max() <= 20 and rows.mean() == pytest.approx(14, abs=0.5)
        # N(128, 127) clipped to [0, 255]: about 16% at each bound, mean 128.
        assert values.min() == 0 and values.max() == 255
        assert np.mean(values == 0) == pytest.approx(0.158, abs=0.02)
        assert values.mean() == pytest.approx(128, abs=3)
    rgb = de.DEConfig.from_preset("paper", num_pixels=3)
    assert rgb.channels == 3 and rgb.num_genes == 15  # RGB as before: (x, y, r, g, b)


def test_apply_candidate_writes_one_value_on_one_channel():
    image = jnp.zeros(SHAPE, jnp.float32)
    candidate = jnp.asarray([3.7, 27.9, 200.4, 0.2, 5.0, 300.0])  # two pixels (x, y, v)
    out = np.asarray(de.apply_candidate(image, candidate))
    assert out[3, 27, 0] == 200 and out[0, 5, 0] == 255 and np.count_nonzero(out) == 2
    applied = de.applied_pixels(np.asarray(candidate)[None], SHAPE)
    assert applied.tolist() == [[[3, 27, 200], [0, 5, 255]]]


def test_colour_sets_follow_the_channel_count():
    assert exhaustive.colour_set("corners", 1).tolist() == [[0], [255]]
    assert len(exhaustive.colour_set("levels:3", 1)) == 3
    assert len(exhaustive.colour_set("corners", 2)) == 4
    assert len(exhaustive.colour_set("corners")) == 8  # RGB's 8 corners


# ---------------------------------------------------------------------------
# The incremental evaluator on one channel.


def gray_placements(num_pixels: int, count: int, seed: int = 0) -> np.ndarray:
    """Candidates [count, k * 3]: corners and borders first, then random positions."""
    rng = np.random.default_rng(seed)
    height, width = SHAPE[:2]
    spots = [(0, 0), (0, width - 1), (height - 1, 0), (height - 1, width - 1), (13, 14)]
    rows = []
    for i in range(count):
        pixels = []
        for j in range(num_pixels):
            y, x = spots[(i + j) % len(spots)] if i < len(spots) else (
                rng.uniform(0, height), rng.uniform(0, width))  # fmt: skip
            pixels += [y, x, rng.uniform(-30, 285)]
        rows.append(pixels)
    return np.asarray(rows, np.float32)


@pytest.mark.parametrize("num_pixels", [1, 3])
def test_incremental_evaluator_is_exact_on_one_channel(gray, num_pixels):
    program = assert_matches_full(
        gray["loaded"], num_pixels, gray_placements(num_pixels, 12), image=gray["images"][0]
    )
    assert any(step.mode == "window" for step in program.steps)  # really incremental


# ---------------------------------------------------------------------------
# Whole runs on grayscale data.


@pytest.fixture(scope="module")
def gray_runs(gray):
    runs = {}
    for evaluator in ("full", "incremental"):
        config = gray_config(gray, num_images=6, evaluator=evaluator)
        workdir = gray["root"] / f"run_{evaluator}"
        summary = run.run_attack(config, str(workdir))
        runs[evaluator] = (config, summary, workdir, workdir_lib.read_all_results(str(workdir)))
    return runs


def test_a_grayscale_run_records_x_y_v_pixels_that_replay_on_the_model(gray, gray_runs):
    _, summary, _, records = gray_runs["full"]
    model = gray["loaded"]
    correct = [i for i in range(NUM_IMAGES) if i not in MISLABELLED][:6]
    assert sorted(r["image"] for r in records) == correct
    assert summary["image_shape"] == list(SHAPE) and summary["attacks"] == 6
    # Six wanted: 0, 1, 3, 4, 6, 8, with 2, 5 and 7 skipped on the way: nine considered.
    assert (summary["images_considered"], summary["clean_correct"]) == (9, 6)
    for record in records:
        assert len(record["perturbation"]) == 1 and len(record["perturbation"][0]) == 3
    adversarial = np.stack(
        [write_pixels(gray["images"][r["image"]], r["perturbation"]) for r in records]
    )
    np.testing.assert_allclose(
        model_probs(model, adversarial), [r["adv_probs"] for r in records], atol=2e-6
    )
    for record, probs in zip(records, model_probs(model, adversarial), strict=True):
        assert record["success"] == (int(np.argmax(probs)) != record["true_label"])
    assert any(r["success"] for r in records)  # so that export has something to write


def test_a_grayscale_run_gives_the_same_records_with_either_evaluator(gray_runs):
    comparison = results.compare_records(gray_runs["full"][3], gray_runs["incremental"][3])
    assert comparison["attacks"] == 6 and comparison["same"] == 6, comparison["differing"]


def test_grayscale_export_and_report(gray, gray_runs, tmp_path):
    _, summary, workdir, records = gray_runs["full"]
    fooled = [r for r in records if r["success"]]
    written = export.export_workdir(str(workdir), str(tmp_path / "png"), "png")
    assert written["images"] == len(fooled)
    pngs = sorted((tmp_path / "png").rglob("*.png"))
    assert len(pngs) == len(fooled)
    assert all(Image.open(p).mode == "L" for p in pngs)  # grayscale PNGs
    # The export reads back as a one-channel folder dataset of the adversarial images.
    back = data.load_dataset(f"folder:{tmp_path / 'png'}", "test", SHAPE)
    assert back.read(range(len(back))).shape == (len(fooled), *SHAPE)
    export.export_workdir(str(workdir), str(tmp_path / "npz"), "npz")
    with np.load(tmp_path / "npz" / "adversarial.npz") as npz:
        assert npz["images"].shape == (len(fooled), *SHAPE)
        assert npz["perturbations"].shape == (len(fooled), 1, 3)
        for image, record in zip(npz["images"], fooled, strict=True):
            source = gray["images"][record["image"]]
            np.testing.assert_array_equal(image, write_pixels(source, record["perturbation"]))
    path = report.write_report([str(workdir)], str(tmp_path / "report"))
    text = open(path).read()
    assert "| 9 | 66.7% (6) |" in text  # clean accuracy over the nine considered
    assert "](examples_run_full.png)" in text
    assert (tmp_path / "report" / "examples_run_full.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((workdir / "summary.json").read_text())["image_shape"] == list(SHAPE)


def test_an_exhaustive_grayscale_search_tries_black_and_white_everywhere(gray, tmp_path):
    config = gray_config(gray, num_images=2, method="exhaustive", **{"exhaustive.stop": "none"})
    run.run_attack(config, str(tmp_path / "search"))
    records = workdir_lib.read_all_results(str(tmp_path / "search"))
    assert len(records) == 2
    for record in records:
        assert record["queries"] == 28 * 28 * 2  # every position, black and white
        assert record["search_complete"]
        assert all(value in (0, 255) for _, _, value in record["perturbation"])


def test_lenet5_has_the_hand_counted_parameters_and_the_mnist_config_plans_on_it(gray):
    # conv1 5x5x1x6 + 6, conv2 5x5x6x16 + 16, fc 400x120 + 120, 120x84 + 84, 84x10 + 10.
    by_hand = 156 + 2416 + 48120 + 10164 + 850
    assert base.count_params(base.variable_shapes(zoo.build("lenet5"), SHAPE)) == by_hand
    config = load_config_file("mnist.py")
    assert (config.data, config.model) == ("tfds:mnist", "random:lenet5")
    with config.unlocked():
        config.data, config.num_images = gray["data"], 4
    the_plan = plan.make_plan(config)
    assert the_plan.model.image_shape == SHAPE and the_plan.search.channels == 1
    assert the_plan.search.num_genes == 3  # one pixel: (x, y, v)
    assert the_plan.items.indices.tolist() == [0, 1, 3, 4]  # 2 is misclassified


def test_the_python_api_attacks_grayscale_images(gray):
    import opa_jax

    module, variables = zoo.build("lenet5"), gray["loaded"].params
    model = opa_jax.Model.from_flax(
        module, variables, image_shape=SHAPE, apply_kwargs={"train": False}
    )
    images, labels = gray["images"][:4], gray["labels"][:4]  # image 2 is misclassified
    result = opa_jax.attack_images(
        model, images, labels, popsize=POPSIZE, generations=4, only_correct=False
    )
    assert len(result.records) == 4
    assert all(len(pixel) == 3 for r in result.records for pixel in r["perturbation"])
    assert (result.summary["images_considered"], result.summary["clean_correct"]) == (4, 3)
    adversarial, fooled = result.adversarial_images()  # rebuilt and checked on the model
    assert adversarial.shape == (len(fooled), *SHAPE)
    with pytest.raises(InputError, match=r"expects \[N, 28, 28, 1\]"):
        opa_jax.attack_images(model, np.repeat(images, 3, axis=-1), labels)
    three = opa_jax.InputConvention(mean=(1.0, 2.0, 3.0))
    with pytest.raises(InputError, match=r"input has 1 channel\(s\); expected one value per"):
        opa_jax.Model.from_flax(module, variables, image_shape=SHAPE, input_convention=three)
