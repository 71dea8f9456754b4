"""Model checkpoints: round trip, compact storage, and clear errors for bad ones."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opa_jax.errors import InputError
from opa_jax.models import base, checkpoint, load_model, zoo

CONFIG = {"width": 0.125, "num_classes": 10}


def random_variables(module, seed=0):
    """Variables without compiling `init`; batch statistics far from their initial 0/1."""
    rng = np.random.default_rng(seed)
    shapes = base.variable_shapes(module, (32, 32, 3))

    def draw(leaf):
        if len(leaf.shape) == 1:
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.normal(0, 1 / np.sqrt(fan_in), leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map(draw, shapes)


@pytest.fixture(scope="module")
def nin():
    module = zoo.build("nin", **CONFIG)
    variables = random_variables(module)
    images = jnp.asarray(np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)), jnp.float32)
    return module, variables, images, base.make_apply_fn(module)(variables, images)


def save(path, variables, name="nin", **kwargs):
    meta = {
        "model_config": CONFIG,
        "dataset": "folder:somewhere",
        "accuracies": {"test": {"accuracy": 0.5, "count": 10}},
        "seed": 3,
    }
    checkpoint.save_model_checkpoint(str(path), name, variables, meta, **kwargs)


def test_round_trip_gives_identical_outputs_and_description(nin, tmp_path):
    _, variables, images, logits = nin
    save(tmp_path / "model", variables)
    model = load_model(f"ckpt:{tmp_path / 'model'}")
    np.testing.assert_array_equal(model.apply_fn(model.params, images), logits)
    assert set(model.params) == {"params", "batch_stats"}
    assert model.image_shape == (32, 32, 3) and model.num_classes == 10
    assert model.class_names[3] == "cat"
    description = json.loads((tmp_path / "model" / "model.json").read_text())
    assert description["model"] == "nin" and description["model_config"] == CONFIG
    assert description["accuracies"]["test"]["accuracy"] == 0.5 and description["seed"] == 3
    assert description["num_params"] == base.count_params(variables)
    assert description["software"]["jax"] == jax.__version__
    assert model.meta["dataset"] == "folder:somewhere"


STORAGE_DTYPES = {"float16": np.float16, "bfloat16": jnp.bfloat16}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_compact_storage_halves_the_file_and_restores_float32(nin, tmp_path, dtype):
    """The restored weights are the float32 weights rounded to the storage dtype, bit for
    bit, and the logits move by what that rounding predicts to first order: the
    derivative of the logits along the rounding error (a jvp), not a loose tolerance."""
    module, variables, images, logits = nin
    save(tmp_path / "full", variables)
    save(tmp_path / "half", variables, weights_dtype=dtype)
    full = os.path.getsize(tmp_path / "full" / checkpoint.VARIABLES_FILE)
    half = os.path.getsize(tmp_path / "half" / checkpoint.VARIABLES_FILE)
    assert half < 0.55 * full
    model = checkpoint.load_model_checkpoint(str(tmp_path / "half"))
    assert {x.dtype for x in jax.tree_util.tree_leaves(model.params)} == {jnp.dtype("float32")}
    storage = STORAGE_DTYPES[dtype]
    rounded = jax.tree_util.tree_map(
        lambda x: np.asarray(x).astype(storage).astype(np.float32), variables
    )
    for got, want in zip(jax.tree_util.tree_leaves(model.params),
                         jax.tree_util.tree_leaves(rounded), strict=True):  # fmt: skip
        np.testing.assert_array_equal(got, want)
    restored = model.apply_fn(model.params, images)
    rounding = jax.tree_util.tree_map(lambda r, x: r - x, rounded, variables)
    # The plain operations: the fast ones' custom VJPs have no forward-mode derivative.
    apply_fn = zoo.make_apply_fn(module.clone(fast_gradients=False))
    _, predicted = jax.jvp(lambda v: apply_fn(v, images), (variables,), (rounding,))
    error = np.asarray(restored - logits)
    predicted = np.asarray(predicted)
    # float16 keeps 11 significant bits, bfloat16 8: about 2^-11 and 2^-8 of the logits.
    # Measured: 7.0e-4 and 7.1e-3 on logits up to 1.6; the first-order prediction is
    # within 0.6% of the error, the rest is second order and float32 rounding.
    assert np.abs(error).max() > 0  # really stored at lower precision
    assert np.abs(error - predicted).max() < 0.05 * np.abs(predicted).max()


def test_weights_of_another_architecture_are_refused(tmp_path):
    allconv = zoo.build("allconv", **CONFIG)
    save(tmp_path / "model", random_variables(allconv), name="nin")  # mislabelled
    with pytest.raises(InputError, match="do not fit the architecture") as error:
        checkpoint.load_model_checkpoint(str(tmp_path / "model"))
    assert "cccp1" in str(error.value)  # names what is missing


def test_weights_of_another_width_are_refused(nin, tmp_path):
    _, variables, _, _ = nin
    save(tmp_path / "model", variables)
    path = tmp_path / "model" / "model.json"
    description = json.loads(path.read_text())
    description["model_config"]["width"] = 0.25
    path.write_text(json.dumps(description))
    with pytest.raises(InputError, match="wrong shape"):
        checkpoint.load_model_checkpoint(str(tmp_path / "model"))


def test_unknown_architecture_in_model_json(nin, tmp_path):
    _, variables, _, _ = nin
    save(tmp_path / "model", variables)
    path = tmp_path / "model" / "model.json"
    path.write_text(path.read_text().replace('"model": "nin"', '"model": "resnet"'))
    with pytest.raises(InputError, match="known: alexnet, allconv, lenet5, nin, vgg16"):
        checkpoint.load_model_checkpoint(str(tmp_path / "model"))


@pytest.mark.parametrize(
    "damage", ["truncate", "truncate_no_digest", "bad_json", "no_json", "gone"]
)
def test_missing_or_corrupt_checkpoints_are_input_errors(nin, tmp_path, damage):
    _, variables, _, _ = nin
    directory = tmp_path / "model"
    save(directory, variables)
    weights, description = directory / checkpoint.VARIABLES_FILE, directory / "model.json"
    if damage.startswith("truncate"):
        weights.write_bytes(weights.read_bytes()[:1000])
        if damage == "truncate_no_digest":  # the msgpack decoder must catch it too
            text = json.loads(description.read_text())
            del text["weights_sha256"]
            description.write_text(json.dumps(text))
        expected = "corrupt"
    elif damage == "bad_json":
        description.write_text("{not json")
        expected = "corrupt"
    elif damage == "no_json":
        description.unlink()
        expected = "no model.json"
    else:
        directory = tmp_path / "elsewhere"
        expected = "no such directory"
    with pytest.raises(InputError, match=expected):
        load_model(f"ckpt:{directory}")


def test_unknown_storage_dtype(nin, tmp_path):
    with pytest.raises(InputError, match="weights_dtype"):
        save(tmp_path / "model", nin[1], weights_dtype="int8")
