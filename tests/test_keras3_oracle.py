"""Keras 3 (JAX backend) as an independent oracle for the Keras 2 HDF5 importer.

Keras 3 reads the real one-pixel-attack-keras models, and its outputs on the
exact CIFAR-10 test images are compared with the importer's. ResNet (a
functional Model) loads with `keras.models.load_model` as it is. LeNet (a
Keras 2.1.4 Sequential) does not: Keras 3 expects the Sequential config as a
dict and the input shape on an InputLayer, so the test rewrites those two
parts of the config and loads the weights with Keras' own HDF5 reader
(docs/models.md, "Keras 3 as an oracle").
"""

import json
import os
import pathlib

import numpy as np
import pytest

os.environ["KERAS_BACKEND"] = "jax"  # Keras 3 reads it once, at import

from opa_jax import attack  # noqa: E402
from opa_jax.data import load_dataset  # noqa: E402
from opa_jax.models import load_model  # noqa: E402
from opa_jax.models.base import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402

keras = pytest.importorskip("keras", minversion="3", reason="Keras 3 is a test-only oracle")
h5py = pytest.importorskip("h5py")

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
NUM_IMAGES = 32

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(
        not all(
            (DATA / p).exists() for p in ("keras/lenet.h5", "keras/resnet.h5", "cifar10-test-exact")
        ),
        reason=f"real data not found at {DATA} (../shared/data relative to the repo root)",
    ),  # fmt: skip
]


def keras3_model(path: pathlib.Path):
    """The HDF5 model as Keras 3 reads it, with the two rewrites a Keras 2.1 Sequential needs."""
    with h5py.File(path, "r") as h5:
        config = json.loads(h5.attrs["model_config"])
        if config["class_name"] != "Sequential" or not isinstance(config["config"], list):
            return keras.models.load_model(path, compile=False)
        from keras.src.legacy.saving import legacy_h5_format, saving_utils

        layers = config["config"]
        shape = layers[0]["config"].pop("batch_input_shape")
        input_layer = {"class_name": "InputLayer", "config": {"batch_shape": shape,
                                                              "name": "input"}}  # fmt: skip
        config["config"] = {"name": "sequential", "layers": [input_layer, *layers]}
        model = saving_utils.model_from_config(config)
        legacy_h5_format.load_weights_from_hdf5_group(h5["model_weights"], model)
        return model


@pytest.fixture(scope="module")
def images():
    dataset = load_dataset(f"folder:{DATA / 'cifar10-test-exact'}", "test", (32, 32, 3))
    return dataset.read(range(NUM_IMAGES))  # [N, 32, 32, 3] uint8


def test_keras2_sequential_config_is_not_read_by_keras3_as_it_is():
    """Why LeNet needs the rewrite: Keras 3 fails on the Keras 2.1 Sequential config."""
    with pytest.raises(TypeError, match="pop expected at most 1 argument"):
        keras.models.load_model(DATA / "keras" / "lenet.h5", compile=False)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The structure of `inputs`")  # Keras 3 on a Keras 2 graph
@pytest.mark.parametrize("name", ["lenet", "resnet"])
def test_importer_matches_keras3_logits_and_probabilities(name, images):
    path = DATA / "keras" / f"{name}.h5"
    reference = keras3_model(path)
    normalised = (images.astype(np.float32) - np.float32(CIFAR10_MEAN)) / np.float32(CIFAR10_STD)
    keras_probs = np.asarray(reference(normalised, training=False))  # the model's softmax
    reference.layers[-1].activation = keras.activations.linear  # the same graph, up to logits
    keras_logits = np.asarray(reference(normalised, training=False))

    model = load_model(f"keras:{path}")
    logits = np.asarray(model.apply_fn(model.params, images.astype(np.float32)))
    probs = attack.predict_probs(model, images)
    assert keras_logits.shape == logits.shape == (NUM_IMAGES, 10)
    np.testing.assert_allclose(logits, keras_logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(probs, keras_probs, atol=1e-5)
    assert np.array_equal(probs.argmax(-1), keras_probs.argmax(-1))
