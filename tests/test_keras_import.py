"""Keras HDF5 import: parity with Keras outputs, a NumPy reference, and bad files."""

import json
import pathlib
import re

import chex
import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import realdata

from opa_jax.errors import InputError
from opa_jax.models import CIFAR10_CLASSES, keras_import, load_model
from opa_jax.models.keras_import import DEFAULT_NORMALIZATION, load_keras_model

DATA = realdata.SHARED
NUM_EXACT_IMAGES = realdata.NUM_EXACT_IMAGES
# Model names used in hyperparticle-results/*.jsonl -> our files.
RESULT_MODELS = {"lecun_net": "lenet", "resnet": "resnet"}

# ---------------------------------------------------------------------------
# Writing Keras 2 HDF5 files by hand.


def keras_layer(class_name, name, inbound=None, **config):
    """One layer entry of a model_config; `inbound` (functional only) lists source layers."""
    entry = {"class_name": class_name, "config": {"name": name, "trainable": True, **config}}
    if inbound is not None:
        entry["name"] = name
        entry["inbound_nodes"] = [[[source, 0, 0, {}] for source in inbound]] if inbound else []
    return entry


def functional_config(layers, input_name, output_name):
    return {
        "class_name": "Model",
        "config": {
            "name": "model_1",
            "layers": layers,
            "input_layers": [[input_name, 0, 0]],
            "output_layers": [[output_name, 0, 0]],
        },
    }


def write_keras_h5(path, model_config, weights, *, config_bytes=False, weight_names=True, attrs=()):
    """Writes a file laid out as Keras 2.1 `model.save()` does.

    weights: {layer name: {weight basename: array}}, in Keras weight order. With
    `weight_names=False` the datasets sit directly in the layer group with no
    `weight_names` attribute, as some writers do.
    """
    with h5py.File(path, "w") as h5:
        h5.attrs["keras_version"] = "2.1.4"
        h5.attrs["backend"] = "tensorflow"
        text = json.dumps(model_config)
        h5.attrs["model_config"] = np.bytes_(text.encode()) if config_bytes else text
        for key, value in dict(attrs).items():
            h5.attrs[key] = value
        root = h5.create_group("model_weights")
        root.attrs["layer_names"] = np.array([name.encode() for name in weights])
        for layer_name, arrays in weights.items():
            group = root.create_group(layer_name)
            names = [f"{layer_name}/{basename}:0" for basename in arrays]
            if weight_names:
                group.attrs["weight_names"] = (
                    np.array([name.encode() for name in names]) if names else np.array([])
                )
            for name, array in zip(names, arrays.values(), strict=True):
                group.create_dataset(name if weight_names else name.split("/")[-1], data=array)
    return path


def random_conv(rng, kh, kw, cin, cout, bias=True):
    weights = {"kernel": rng.normal(0, 1 / np.sqrt(kh * kw * cin), (kh, kw, cin, cout))}
    if bias:
        weights["bias"] = rng.normal(0, 0.1, (cout,))
    return {key: value.astype(np.float32) for key, value in weights.items()}


def random_dense(rng, cin, cout):
    kernel = rng.normal(0, 1 / np.sqrt(cin), (cin, cout)).astype(np.float32)
    return {"kernel": kernel, "bias": rng.normal(0, 0.1, (cout,)).astype(np.float32)}


def random_batchnorm(rng, channels, center=True, scale=True):
    weights = {}
    if scale:
        weights["gamma"] = rng.uniform(0.5, 1.5, channels)
    if center:
        weights["beta"] = rng.normal(0, 0.2, channels)
    weights["moving_mean"] = rng.normal(0, 0.3, channels)
    weights["moving_variance"] = rng.uniform(0.3, 2.0, channels)
    return {key: value.astype(np.float32) for key, value in weights.items()}


# ---------------------------------------------------------------------------
# An independent NumPy forward pass (float64), following TensorFlow's conventions.


def same_pads(size, window, stride):
    """TensorFlow 'same': out = ceil(size / stride), the odd pixel of padding goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + window - size, 0)
    return (total // 2, total - total // 2)


def np_conv2d(x, kernel, bias=None, strides=(1, 1), padding="valid", dilation=(1, 1)):
    kh, kw = kernel.shape[:2]
    window = ((kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1)
    if padding == "same":
        pads = [same_pads(x.shape[1 + a], window[a], strides[a]) for a in (0, 1)]
        x = np.pad(x, ((0, 0), *pads, (0, 0)))
    out_h = (x.shape[1] - window[0]) // strides[0] + 1
    out_w = (x.shape[2] - window[1]) // strides[1] + 1
    out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[3]))
    for i in range(kh):
        for j in range(kw):
            rows = slice(
                i * dilation[0], i * dilation[0] + (out_h - 1) * strides[0] + 1, strides[0]
            )
            cols = slice(
                j * dilation[1], j * dilation[1] + (out_w - 1) * strides[1] + 1, strides[1]
            )
            out += x[:, rows, cols, :] @ kernel[i, j].astype(np.float64)
    return out if bias is None else out + bias


def np_pool(x, size, strides, padding, reduce):
    """Pads with NaN so that np.nanmax / np.nanmean ignore the padding, as TF does."""
    if padding == "same":
        pads = [same_pads(x.shape[1 + a], size[a], strides[a]) for a in (0, 1)]
        x = np.pad(x, ((0, 0), *pads, (0, 0)), constant_values=np.nan)
    out_h = (x.shape[1] - size[0]) // strides[0] + 1
    out_w = (x.shape[2] - size[1]) // strides[1] + 1
    out = np.zeros((x.shape[0], out_h, out_w, x.shape[3]))
    for a in range(out_h):
        for b in range(out_w):
            rows = slice(a * strides[0], a * strides[0] + size[0])
            cols = slice(b * strides[1], b * strides[1] + size[1])
            out[:, a, b] = reduce(x[:, rows, cols, :], axis=(1, 2))
    return out


def np_batchnorm(x, weights, epsilon):
    y = (x - weights["moving_mean"]) / np.sqrt(weights["moving_variance"] + epsilon)
    return y * weights.get("gamma", 1.0) + weights.get("beta", 0.0)


def np_normalize(images, mean, std):
    return (images.astype(np.float64) - np.array(mean)) / np.array(std)


def np_elu(x):
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0)))


def np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def np_relu(x):
    return np.maximum(x, 0)


# ---------------------------------------------------------------------------
# Synthetic models.


@pytest.fixture(scope="module")
def functional_file(tmp_path_factory):
    """A residual/branching functional model on 10x10 inputs, layers listed out of order."""
    rng = np.random.default_rng(0)
    layers = [
        keras_layer("InputLayer", "input_1", [], batch_input_shape=[None, 10, 10, 3]),
        keras_layer(
            "Conv2D", "conv_a", ["input_1"], filters=8, kernel_size=[3, 3], strides=[1, 1],
            padding="same", dilation_rate=[2, 2], activation="relu", use_bias=True,
            data_format="channels_last",
        ),
        keras_layer("BatchNormalization", "bn_a", ["conv_a"], axis=-1, epsilon=1e-3),
        keras_layer("Activation", "act_a", ["bn_a"], activation="tanh"),
        keras_layer(
            "Conv2D", "conv_b", ["act_a"], filters=8, kernel_size=[3, 3], strides=[2, 2],
            padding="same", activation="linear", use_bias=False,
        ),
        keras_layer(
            "Conv2D", "conv_c", ["input_1"], filters=8, kernel_size=[1, 1], strides=[2, 2],
            padding="same", activation="sigmoid",
        ),
        keras_layer("Add", "add_1", ["conv_b", "conv_c"]),
        keras_layer("BatchNormalization", "bn_b", ["add_1"], epsilon=0.01, center=False),
        keras_layer("Activation", "act_b", ["bn_b"], activation="elu"),
        keras_layer(
            "MaxPooling2D", "pool_max", ["act_b"], pool_size=[3, 3], strides=[2, 2],
            padding="same",
        ),
        keras_layer(
            "AveragePooling2D", "pool_avg", ["act_b"], pool_size=[3, 3], strides=[2, 2],
            padding="same",
        ),
        keras_layer("Concatenate", "concat_1", ["pool_max", "pool_avg"], axis=-1),
        keras_layer("GlobalAveragePooling2D", "gap", ["concat_1"]),
        keras_layer("Flatten", "flatten_1", ["concat_1"]),
        keras_layer("Dense", "dense_flat", ["flatten_1"], units=16, activation="relu"),
        keras_layer("Concatenate", "concat_2", ["gap", "dense_flat"], axis=1),
        keras_layer("Dropout", "dropout_1", ["concat_2"], rate=0.5),
        keras_layer("BatchNormalization", "bn_c", ["dropout_1"], scale=False, epsilon=1e-3),
        keras_layer("Dense", "dense_out", ["bn_c"], units=5, activation="softmax"),
    ]  # fmt: skip
    config = functional_config(layers[::-1], "input_1", "dense_out")  # reversed on purpose
    weights = {
        "input_1": {},
        "conv_a": random_conv(rng, 3, 3, 3, 8),
        "bn_a": random_batchnorm(rng, 8),
        "conv_b": random_conv(rng, 3, 3, 8, 8, bias=False),
        "conv_c": random_conv(rng, 1, 1, 3, 8),
        "bn_b": random_batchnorm(rng, 8, center=False),
        "dense_flat": random_dense(rng, 3 * 3 * 16, 16),
        "bn_c": random_batchnorm(rng, 32, scale=False),
        "dense_out": random_dense(rng, 32, 5),
        "pool_max": {},
    }
    path = tmp_path_factory.mktemp("keras") / "functional.h5"
    return write_keras_h5(path, config, weights), weights


def functional_reference(images, w):
    x = np_normalize(images, DEFAULT_NORMALIZATION["mean"], DEFAULT_NORMALIZATION["std"])
    a = np_relu(np_conv2d(x, **w["conv_a"], padding="same", dilation=(2, 2)))
    a = np.tanh(np_batchnorm(a, w["bn_a"], 1e-3))
    b = np_conv2d(a, **w["conv_b"], strides=(2, 2), padding="same")
    c = np_sigmoid(np_conv2d(x, **w["conv_c"], strides=(2, 2), padding="same"))
    s = np_elu(np_batchnorm(b + c, w["bn_b"], 0.01))  # [N, 5, 5, 8]
    pooled = np.concatenate(
        [
            np_pool(s, (3, 3), (2, 2), "same", np.nanmax),
            np_pool(s, (3, 3), (2, 2), "same", np.nanmean),
        ],
        axis=-1,
    )  # [N, 3, 3, 16]
    flat = np.stack([pooled[n].reshape(-1) for n in range(len(pooled))])  # (h, w, c) order
    dense = np_relu(flat @ w["dense_flat"]["kernel"] + w["dense_flat"]["bias"])
    features = np.concatenate([pooled.mean(axis=(1, 2)), dense], axis=1)
    features = np_batchnorm(features, w["bn_c"], 1e-3)
    return features @ w["dense_out"]["kernel"] + w["dense_out"]["bias"]  # logits


@pytest.fixture(scope="module")
def sequential_file(tmp_path_factory):
    """A Keras 2.2-style Sequential (dict config with an InputLayer), stored as bytes,
    with its own normalization and datasets directly in each layer group."""
    rng = np.random.default_rng(1)
    layers = [
        keras_layer("InputLayer", "input_1", batch_input_shape=[None, 9, 9, 3]),
        keras_layer("ZeroPadding2D", "zero_padding2d_1", padding=[[1, 2], [0, 1]]),
        keras_layer(
            "Conv2D", "conv2d_1", filters=4, kernel_size=[3, 3], strides=[2, 2], padding="valid",
            activation="relu",
        ),
        keras_layer("AveragePooling2D", "avg_1", pool_size=[2, 2], strides=[1, 1], padding="same"),
        keras_layer("MaxPooling2D", "max_1", pool_size=[2, 2], strides=None, padding="valid"),
        keras_layer("Flatten", "flatten_1"),
        keras_layer("Dense", "dense_1", units=7, activation="tanh"),
        keras_layer("Dropout", "dropout_1", rate=0.3),
        keras_layer("Dense", "dense_2", units=3, activation="linear"),
        keras_layer("Activation", "activation_1", activation="softmax"),
    ]  # fmt: skip
    config = {"class_name": "Sequential", "config": {"name": "sequential_1", "layers": layers}}
    weights = {
        "conv2d_1": random_conv(rng, 3, 3, 3, 4),
        "dense_1": random_dense(rng, 2 * 2 * 4, 7),
        "dense_2": random_dense(rng, 7, 3),
    }
    normalization = {"mean": [100.0, 110.0, 120.0], "std": [50.0, 60.0, 70.0]}
    path = tmp_path_factory.mktemp("keras") / "sequential.h5"
    write_keras_h5(
        path,
        config,
        weights,
        config_bytes=True,
        weight_names=False,
        attrs={"normalization": json.dumps(normalization)},
    )
    return path, weights, normalization


def sequential_reference(images, w, normalization):
    x = np_normalize(images, normalization["mean"], normalization["std"])
    x = np.pad(x, ((0, 0), (1, 2), (0, 1), (0, 0)))  # [N, 12, 10, 3]
    x = np_relu(np_conv2d(x, **w["conv2d_1"], strides=(2, 2)))  # [N, 5, 4, 4]
    x = np_pool(x, (2, 2), (1, 1), "same", np.nanmean)
    x = np_pool(x, (2, 2), (2, 2), "valid", np.nanmax)  # [N, 2, 2, 4]
    x = np.tanh(x.reshape(len(x), -1) @ w["dense_1"]["kernel"] + w["dense_1"]["bias"])
    return x @ w["dense_2"]["kernel"] + w["dense_2"]["bias"]


def softmax(logits):
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def test_functional_model_matches_numpy_reference(functional_file):
    path, weights = functional_file
    model = load_keras_model(str(path))
    images = np.random.default_rng(2).uniform(0, 255, (4, 10, 10, 3)).astype(np.float32)
    logits = np.asarray(jax.jit(model.apply_fn)(model.params, images))
    reference = functional_reference(images, weights)
    assert logits.shape == (4, 5)
    np.testing.assert_allclose(logits, reference, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(softmax(logits), softmax(reference), atol=1e-6)


def test_sequential_model_matches_numpy_reference(sequential_file):
    path, weights, normalization = sequential_file
    model = load_keras_model(str(path))
    images = np.random.default_rng(3).uniform(0, 255, (5, 9, 9, 3)).astype(np.float32)
    logits = np.asarray(jax.jit(model.apply_fn)(model.params, images))
    np.testing.assert_allclose(
        logits, sequential_reference(images, weights, normalization), atol=2e-5, rtol=1e-5
    )
    assert model.meta["normalization"]["mean"] == normalization["mean"]
    assert model.meta["normalization"]["std"] == normalization["std"]
    assert model.meta["architecture"] == {"class_name": "Sequential", "num_layers": 10}
    assert (model.image_shape, model.num_classes, model.class_names) == ((9, 9, 3), 3, None)


def test_model_interface(functional_file):
    path, weights = functional_file
    model = load_model(f"keras:{path}")
    assert model.name == f"keras:{path}"
    assert (model.image_shape, model.num_classes) == ((10, 10, 3), 5)
    assert model.meta["keras_version"] == "2.1.4"
    assert model.meta["source"] == str(pathlib.Path(path).resolve())
    assert model.meta["architecture"] == {"class_name": "Model", "num_layers": 19}
    assert model.meta["normalization"]["mean"] == list(DEFAULT_NORMALIZATION["mean"])
    assert model.meta["param_count"] == sum(a.size for w in weights.values() for a in w.values())
    leaves = jax.tree.leaves(model.params)
    assert leaves and all(isinstance(a, jax.Array) and a.dtype == jnp.float32 for a in leaves)
    # Layer names are kept, and Keras gamma/beta/moving stats land in Flax's BatchNorm slots.
    np.testing.assert_array_equal(
        model.params["batch_stats"]["bn_a"]["var"], weights["bn_a"]["moving_variance"]
    )
    np.testing.assert_array_equal(model.params["params"]["bn_a"]["scale"], weights["bn_a"]["gamma"])
    assert "bias" not in model.params["params"]["conv_b"]

    # One trace serves every batch of the same shape; uint8 pixels are accepted too.
    apply_fn = jax.jit(chex.assert_max_traces(model.apply_fn, n=1))
    images = np.random.default_rng(4).integers(0, 256, (3, 3, 10, 10, 3), dtype=np.uint8)
    first = apply_fn(model.params, images[0].astype(np.float32))
    for batch in images[1:]:
        apply_fn(model.params, batch.astype(np.float32))
    unjitted = model.apply_fn(model.params, images[0])
    np.testing.assert_allclose(np.asarray(first), np.asarray(unjitted), atol=1e-6)


@pytest.mark.parametrize(
    "merge, reference",
    [
        ("Subtract", lambda a, b: a - b),
        ("Multiply", lambda a, b: a * b),
        ("Average", lambda a, b: (a + b) / 2),
        ("Maximum", np.maximum),
        ("Minimum", np.minimum),
    ],
)
def test_merge_layers(tmp_path, merge, reference):
    rng = np.random.default_rng(8)
    layers = [
        keras_layer("InputLayer", "input_1", [], batch_input_shape=[None, 6, 6, 3]),
        keras_layer(
            "Conv2D", "conv_1", ["input_1"], filters=4, kernel_size=[3, 3], strides=2,
            padding="same",
        ),  # -> 3x3
        keras_layer("Conv2D", "conv_2", ["input_1"], filters=4, kernel_size=[1, 1], strides=2),
        keras_layer("ZeroPadding2D", "pad_1", ["conv_2"], padding=[0, 1]),  # 3x3 -> 3x5
        keras_layer("Conv2D", "conv_3", ["pad_1"], filters=4, kernel_size=[1, 3]),  # -> 3x3
        keras_layer(
            "MaxPooling2D", "pool_1", ["conv_1"], pool_size=[2, 2], strides=1, padding="same",
        ),
        keras_layer(merge, "merge_1", ["pool_1", "conv_3"]),
        keras_layer("GlobalMaxPooling2D", "gmp_1", ["merge_1"]),
        keras_layer("Dense", "dense_1", ["gmp_1"], units=10, activation="softmax"),
    ]  # fmt: skip
    weights = {
        "conv_1": random_conv(rng, 3, 3, 3, 4),
        "conv_2": random_conv(rng, 1, 1, 3, 4),
        "conv_3": random_conv(rng, 1, 3, 4, 4),
        "dense_1": random_dense(rng, 4, 10),
    }
    config = functional_config(layers, "input_1", "dense_1")
    model = load_keras_model(str(write_keras_h5(tmp_path / "merge.h5", config, weights)))
    images = rng.uniform(0, 255, (3, 6, 6, 3)).astype(np.float32)

    x = np_normalize(images, DEFAULT_NORMALIZATION["mean"], DEFAULT_NORMALIZATION["std"])
    a = np_conv2d(x, **weights["conv_1"], strides=(2, 2), padding="same")
    a = np_pool(a, (2, 2), (1, 1), "same", np.nanmax)  # [N, 3, 3, 4]
    b = np_conv2d(x, **weights["conv_2"], strides=(2, 2))
    b = np_conv2d(np.pad(b, ((0, 0), (0, 0), (1, 1), (0, 0))), **weights["conv_3"])
    features = reference(a, b).max(axis=(1, 2))
    logits = features @ weights["dense_1"]["kernel"] + weights["dense_1"]["bias"]
    np.testing.assert_allclose(model.apply_fn(model.params, images), logits, atol=2e-5)


# ---------------------------------------------------------------------------
# Unsupported models and bad files.


def single_conv_model(tmp_path, *, final="softmax", extra_layer=None, channels=3):
    """Input -> Conv2D -> GAP -> Dense(final): the smallest classifier, for error cases."""
    rng = np.random.default_rng(5)
    layers = [
        keras_layer("InputLayer", "input_1", [], batch_input_shape=[None, 8, 8, channels]),
        keras_layer("Conv2D", "conv2d_1", ["input_1"], filters=4, kernel_size=[3, 3]),
        keras_layer("GlobalAveragePooling2D", "gap_1", ["conv2d_1"]),
        keras_layer("Dense", "dense_1", ["gap_1"], units=10, activation=final),
    ]
    if extra_layer is not None:
        layers.insert(3, extra_layer)
        layers[4]["inbound_nodes"] = [[[extra_layer["name"], 0, 0, {}]]]
    weights = {"conv2d_1": random_conv(rng, 3, 3, channels, 4), "dense_1": random_dense(rng, 4, 10)}
    return functional_config(layers, "input_1", "dense_1"), weights


def test_smallest_model_loads(tmp_path):
    config, weights = single_conv_model(tmp_path)
    model = load_keras_model(str(write_keras_h5(tmp_path / "ok.h5", config, weights)))
    assert model.num_classes == 10 and model.class_names == CIFAR10_CLASSES


def test_unsupported_layer_names_class_layer_and_file(tmp_path):
    lstm = keras_layer("LSTM", "lstm_1", ["gap_1"], units=4)
    config, weights = single_conv_model(tmp_path, extra_layer=lstm)
    path = write_keras_h5(tmp_path / "lstm.h5", config, weights)
    with pytest.raises(InputError, match="lstm_1") as info:
        load_keras_model(str(path))
    assert "'LSTM'" in str(info.value) and str(path) in str(info.value)
    assert str(info.value).endswith("supported layers: " + ", ".join(keras_import.LAYERS))


def test_a_layer_is_one_entry_of_the_table(tmp_path, monkeypatch):
    """The module docstring's example: one `LAYERS` entry makes LeakyReLU importable."""
    leaky = keras_layer("LeakyReLU", "leaky_1", ["gap_1"], alpha=0.25)
    config, weights = single_conv_model(tmp_path, extra_layer=leaky)
    path = str(write_keras_h5(tmp_path / "leaky.h5", config, weights))
    with pytest.raises(InputError, match="'LeakyReLU' is not supported"):
        load_keras_model(path)
    monkeypatch.setitem(
        keras_import.LAYERS,
        "LeakyReLU",
        keras_import.LayerRule(
            parse=lambda config: {"alpha": float(config.get("alpha", 0.3))},
            apply=lambda layer, x, precision: jax.nn.leaky_relu(x, layer.option("alpha")),
        ),
    )
    model = load_keras_model(path)
    images = np.random.default_rng(8).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    x = np_normalize(images, DEFAULT_NORMALIZATION["mean"], DEFAULT_NORMALIZATION["std"])
    features = np_conv2d(x, **weights["conv2d_1"]).mean(axis=(1, 2))
    features = np.where(features > 0, features, 0.25 * features)
    logits = features @ weights["dense_1"]["kernel"] + weights["dense_1"]["bias"]
    np.testing.assert_allclose(model.apply_fn(model.params, images), logits, atol=2e-5)


def test_output_must_be_softmax(tmp_path):
    config, weights = single_conv_model(tmp_path, final="sigmoid")
    path = write_keras_h5(tmp_path / "sigmoid.h5", config, weights)
    with pytest.raises(InputError, match="not a softmax"):
        load_keras_model(str(path))


def test_input_must_be_rgb(tmp_path):
    config, weights = single_conv_model(tmp_path, channels=1)
    path = write_keras_h5(tmp_path / "gray.h5", config, weights)
    with pytest.raises(InputError, match=r"expected \[null, H, W, 3\]"):
        load_keras_model(str(path))


def break_config(layers, how):
    """Damages the single_conv_model layer list in place, one way per case."""
    if how == "missing_option":
        del layers[1]["config"]["filters"]
    elif how == "unknown_input":
        layers[2]["inbound_nodes"] = [[["conv2d_9", 0, 0, {}]]]
    elif how == "cycle":
        layers[1]["inbound_nodes"] = [[["gap_1", 0, 0, {}]]]
    elif how == "shapes":  # adds a 6x6 feature map to the 8x8 input
        layers.insert(2, keras_layer("Add", "add_1", ["input_1", "conv2d_1"]))
        layers[3]["inbound_nodes"] = [[["add_1", 0, 0, {}]]]


@pytest.mark.parametrize(
    "how, message",
    [
        ("missing_option", "malformed model_config.*filters"),
        ("unknown_input", "unknown layer 'conv2d_9'"),
        ("cycle", "cycle"),
        ("shapes", "do not fit together"),
    ],
)
def test_inconsistent_graph(tmp_path, how, message):
    config, weights = single_conv_model(tmp_path)
    break_config(config["config"]["layers"], how)
    path = write_keras_h5(tmp_path / f"{how}.h5", config, weights)
    with pytest.raises(InputError, match=message):
        load_keras_model(str(path))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        load_keras_model(str(tmp_path / "nope.h5"))
    with pytest.raises(InputError, match="not a file"):
        load_keras_model(str(tmp_path))


def test_garbage_bytes(tmp_path):
    path = tmp_path / "garbage.h5"
    path.write_bytes(np.random.default_rng(6).bytes(4096))
    with pytest.raises(InputError, match="not an HDF5 file"):
        load_keras_model(str(path))
    # An HDF5 signature followed by garbage is detected when opening.
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + np.random.default_rng(7).bytes(4096))
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_keras_model(str(path))


def truncated_copies(source, tmp_path):
    data = source.read_bytes()
    for fraction in (0.05, 0.5, 0.95):
        path = tmp_path / f"truncated_{fraction}.h5"
        path.write_bytes(data[: int(len(data) * fraction)])
        yield path


def test_truncated_synthetic_file(functional_file, tmp_path):
    for path in truncated_copies(functional_file[0], tmp_path):
        with pytest.raises(InputError, match="corrupt or truncated"):
            load_keras_model(str(path))


@pytest.mark.realdata
def test_truncated_lenet(tmp_path):
    realdata.require(realdata.LENET)
    for path in truncated_copies(DATA / "keras" / "lenet.h5", tmp_path):
        with pytest.raises(InputError, match=re.escape(str(path))):
            load_keras_model(str(path))


def test_missing_model_config(tmp_path):
    path = tmp_path / "weights_only.h5"
    with h5py.File(path, "w") as h5:
        h5.create_group("model_weights").create_dataset("conv2d_1/kernel:0", data=np.zeros(3))
    with pytest.raises(InputError, match="no 'model_config'"):
        load_keras_model(str(path))


def test_missing_layer_weights(tmp_path):
    config, weights = single_conv_model(tmp_path)
    del weights["conv2d_1"]
    path = write_keras_h5(tmp_path / "missing.h5", config, weights)
    with pytest.raises(InputError, match="no weights for Conv2D layer 'conv2d_1'"):
        load_keras_model(str(path))
    config, weights = single_conv_model(tmp_path)
    del weights["dense_1"]["bias"]
    path = write_keras_h5(tmp_path / "missing_bias.h5", config, weights)
    with pytest.raises(InputError, match=r"'dense_1' has weights \['kernel'\]"):
        load_keras_model(str(path))


def test_weight_shape_mismatch(tmp_path):
    config, weights = single_conv_model(tmp_path)
    weights["dense_1"]["kernel"] = np.zeros((5, 10), np.float32)
    path = write_keras_h5(tmp_path / "shape.h5", config, weights)
    with pytest.raises(InputError, match=r"'kernel' has shape \(5, 10\).*\(4, 10\)"):
        load_keras_model(str(path))


# ---------------------------------------------------------------------------
# The real pretrained models (../shared/data).


@pytest.fixture(scope="module")
def exact_images():
    """The 1,017 bit-exact CIFAR-10 test images, by official index, and their labels."""
    from PIL import Image

    realdata.require(realdata.CIFAR10_EXACT)

    root = DATA / "cifar10-test-exact" / "test"
    images, labels = [], []
    for index in range(NUM_EXACT_IMAGES):
        (file,) = root.glob(f"*/{index:05d}.png")
        images.append(np.asarray(Image.open(file).convert("RGB")))
        labels.append(CIFAR10_CLASSES.index(file.parent.name))
    return np.stack(images).astype(np.float32), np.array(labels)  # [1017, 32, 32, 3], [1017]


@pytest.fixture(scope="module")
def real_models():
    realdata.require(realdata.LENET, realdata.RESNET)
    return {name: load_model(f"keras:{DATA / 'keras' / name}.h5") for name in ("lenet", "resnet")}


def published_prior_probs():
    """({(our model name, test index): Keras softmax output}, number of records read).

    Records of the same image agree exactly (checked here), so each image is kept once.
    """
    probs, num_records = {}, 0
    for file in ("untargeted.jsonl", "targeted.jsonl"):
        for line in (DATA / "hyperparticle-results" / file).read_text().splitlines():
            record = json.loads(line)
            if record["model"] in RESULT_MODELS and record["image"] < NUM_EXACT_IMAGES:
                key = (RESULT_MODELS[record["model"]], record["image"])
                if key in probs:
                    np.testing.assert_array_equal(probs[key], record["prior_probs"])
                probs[key] = np.array(record["prior_probs"])
                num_records += 1
    return probs, num_records


@pytest.mark.realdata
def test_real_models_metadata(real_models):
    lenet, resnet = real_models["lenet"], real_models["resnet"]
    assert lenet.meta["param_count"] == 62_006 and resnet.meta["param_count"] == 470_218
    assert lenet.meta["architecture"] == {"class_name": "Sequential", "num_layers": 8}
    assert resnet.meta["architecture"]["class_name"] == "Model"
    for model in (lenet, resnet):
        assert (model.image_shape, model.num_classes) == ((32, 32, 3), 10)
        assert model.class_names == CIFAR10_CLASSES
        assert model.meta["keras_version"] == "2.1.4"


@pytest.mark.realdata
def test_parity_with_published_keras_outputs(real_models, exact_images):
    results = realdata.HYPERPARTICLE_RESULTS
    realdata.require(results / "untargeted.jsonl", results / "targeted.jsonl")
    images, _ = exact_images
    expected, num_records = published_prior_probs()
    max_diff = {}
    for name in ("lenet", "resnet"):
        indices = sorted(index for model, index in expected if model == name)
        assert indices, f"no published records for {name} with image < {NUM_EXACT_IMAGES}"
        model = real_models[name]
        probs = np.asarray(jax.nn.softmax(jax.jit(model.apply_fn)(model.params, images[indices])))
        target = np.stack([expected[name, index] for index in indices])
        max_diff[name] = float(np.abs(probs - target).max())
    print(f"parity: {num_records} records, {len(expected)} images, max abs diff {max_diff}")
    # 66 LeNet records (14 images) and 57 ResNet records (11 images).
    assert (num_records, len(expected)) == (123, 25)
    assert max(max_diff.values()) < 1e-5, max_diff


@pytest.mark.realdata
def test_accuracy_on_exact_test_images(real_models, exact_images):
    images, labels = exact_images
    correct = {}
    for name, model in real_models.items():
        logits = jax.jit(model.apply_fn)(model.params, images)
        correct[name] = int((np.asarray(logits).argmax(axis=1) == labels).sum())
    # LeNet's published accuracy is 74.9%; ResNet's (92.3%) is over all 10,000 images.
    assert correct["lenet"] == 762 and round(100 * 762 / NUM_EXACT_IMAGES, 1) == 74.9
    assert correct["resnet"] == 949
