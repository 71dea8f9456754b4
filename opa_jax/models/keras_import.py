"""Keras 2.x HDF5 models (`model.save(...)`) imported into a Flax linen module.

The `model_config` JSON attribute gives the graph (Sequential or functional `Model`),
and `model_weights/<layer>/.../<weight>:0` the arrays. Each Keras layer becomes a Flax
layer of the same name, evaluated in topological order, in inference mode (Dropout is
the identity, BatchNormalization uses its moving statistics).

The imported `apply_fn` takes float RGB pixels in [0, 255] and returns logits: it
normalises per channel first (the Hyperparticle CIFAR-10 mean/std, or a root attribute
`normalization` = JSON {"mean": [3 floats], "std": [3 floats]} when the file has one),
and it drops the model's final softmax, so softmax(logits) equals the Keras output.
Convolutions and matmuls run at HIGHEST precision so that the parity also holds on
accelerators whose default float32 matmuls are lower precision (e.g. TF32).

`LAYERS` maps each supported Keras layer class to one `LayerRule`: how to read its
config, which Flax variables its weights become, and how to apply it. The list of
supported layers and the weight check both read the table, so adding a layer is one
entry. For example, Keras' `LeakyReLU` layer:

    LAYERS["LeakyReLU"] = LayerRule(
        parse=lambda config: {"alpha": float(config.get("alpha", 0.3))},
        apply=lambda layer, x, precision: jax.nn.leaky_relu(x, layer.option("alpha")),
    )
"""

from __future__ import annotations

import dataclasses
import functools
import graphlib
import json
import operator
from collections.abc import Callable
from typing import Any, NoReturn

import flax.linen as nn
import h5py
import jax
import jax.numpy as jnp
import numpy as np

from opa_jax.errors import InputError
from opa_jax.models import importing
from opa_jax.models.base import CIFAR10_MEAN, CIFAR10_STD, LoadedModel

# The one-pixel-attack-keras models (Hyperparticle) standardise their input with the
# CIFAR-10 training set's statistics before their first layer.
DEFAULT_NORMALIZATION = {"mean": CIFAR10_MEAN, "std": CIFAR10_STD}

_error = functools.partial(importing.error, "keras")  # (path, message) -> InputError

_ACTIVATIONS = {
    "linear": lambda x: x,
    "relu": jax.nn.relu,
    "softmax": lambda x: jax.nn.softmax(x, axis=-1),
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "elu": jax.nn.elu,
}


@dataclasses.dataclass(frozen=True)
class KerasLayer:
    """One Keras layer reduced to what inference needs; hashable, so a module field."""

    name: str
    class_name: str
    inputs: tuple[str, ...]  # names of the layers whose outputs it consumes
    options: tuple[tuple[str, Any], ...] = ()  # validated config, e.g. (("units", 10),)

    def option(self, key: str) -> Any:
        return dict(self.options)[key]


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """One layer's Keras `config`, with the checks that the parsers share."""

    class_name: str
    name: str
    config: dict
    path: str  # the file, for error messages

    def __getitem__(self, key: str) -> Any:
        return self.config[key]  # a required option; missing: a malformed model_config

    def get(self, key: str, default: Any = None) -> Any:
        return self.config.get(key, default)

    def fail(self, what: str) -> NoReturn:
        raise _error(self.path, f"{self.class_name} layer {self.name!r}: {what}")

    def activation(self) -> str:
        act = self.get("activation", "linear")
        if not isinstance(act, str) or act not in _ACTIVATIONS:
            self.fail(
                f"activation {act!r} is not supported; expected one of {sorted(_ACTIVATIONS)}"
            )
        return act

    def padding(self) -> str:
        pad = str(self.get("padding", "valid")).upper()
        if pad not in ("VALID", "SAME"):
            self.fail(f"padding {self.get('padding')!r}; expected 'valid' or 'same'")
        return pad

    def pair(self, key: str, default: Any = None) -> tuple[int, int]:
        value = self.get(key, default)
        value = [value, value] if isinstance(value, int) else value
        if not isinstance(value, list | tuple) or len(value) != 2:
            self.fail(f"{key} {value!r}; expected two integers")
        return (int(value[0]), int(value[1]))


@dataclasses.dataclass(frozen=True)
class LayerRule:
    """How one Keras layer class is imported."""

    parse: Callable[[LayerConfig], dict]  # the validated options inference needs
    # (layer, input, precision) -> output; a merge gets the list of its inputs.
    apply: Callable[[KerasLayer, Any, jax.lax.Precision | None], jax.Array]
    # Keras weight basename -> (Flax collection, Flax variable name).
    weights: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    inputs: str = "one"  # how many inputs it takes: 'one', 'two or more' or 'any'


# ---------------------------------------------------------------------------------------------
# The rules' parts: options from a config, and the layers' forward passes.


def _no_options(config: LayerConfig) -> dict:
    return {}


def _input_options(config: LayerConfig) -> dict:
    return {"shape": _batch_input_shape(config.config, config.path)}


def _conv2d_options(config: LayerConfig) -> dict:
    options = {
        "filters": int(config["filters"]),
        "kernel_size": config.pair("kernel_size"),
        "strides": config.pair("strides", [1, 1]),
        "dilation_rate": config.pair("dilation_rate", [1, 1]),
        "padding": config.padding(),
        "use_bias": bool(config.get("use_bias", True)),
        "activation": config.activation(),
    }
    if config.get("groups", 1) != 1:
        config.fail(f"groups {config['groups']}; expected 1")
    return options


def _conv2d(layer: KerasLayer, x, precision):
    x = nn.Conv(
        layer.option("filters"),
        layer.option("kernel_size"),
        strides=layer.option("strides"),
        padding=layer.option("padding"),
        kernel_dilation=layer.option("dilation_rate"),
        use_bias=layer.option("use_bias"),
        precision=precision,
        name=layer.name,
    )(x)
    return _ACTIVATIONS[layer.option("activation")](x)


def _dense_options(config: LayerConfig) -> dict:
    return {
        "units": int(config["units"]),
        "use_bias": bool(config.get("use_bias", True)),
        "activation": config.activation(),
    }


def _dense(layer: KerasLayer, x, precision):
    x = nn.Dense(
        layer.option("units"),
        use_bias=layer.option("use_bias"),
        precision=precision,
        name=layer.name,
    )(x)
    return _ACTIVATIONS[layer.option("activation")](x)


def _batch_norm_options(config: LayerConfig) -> dict:
    axis = config.get("axis", -1)
    axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
    if not isinstance(axis, int):
        config.fail(f"axis {axis!r}; expected the channels axis -1")
    return {
        "axis": axis,
        "epsilon": float(config.get("epsilon", 1e-3)),
        "center": bool(config.get("center", True)),
        "scale": bool(config.get("scale", True)),
    }


def _batch_norm(layer: KerasLayer, x, precision):
    axis = layer.option("axis")
    if axis not in (-1, x.ndim - 1):
        raise InputError(
            f"BatchNormalization layer {layer.name!r}: axis {axis} is not the "
            "channels axis; only channels-last (axis -1) is supported"
        )
    return nn.BatchNorm(
        use_running_average=True,
        epsilon=layer.option("epsilon"),
        use_bias=layer.option("center"),
        use_scale=layer.option("scale"),
        name=layer.name,
    )(x)


def _activation_options(config: LayerConfig) -> dict:
    return {"activation": config.activation()}


def _pool_options(config: LayerConfig) -> dict:
    pool_size = config.pair("pool_size", [2, 2])
    strides = pool_size if config.get("strides") is None else config.pair("strides")
    return {"pool_size": pool_size, "strides": strides, "padding": config.padding()}


def _average_pool(layer: KerasLayer, x, precision):
    # Keras (TF) 'same' average pooling divides by the number of real pixels.
    return nn.avg_pool(
        x,
        layer.option("pool_size"),
        layer.option("strides"),
        layer.option("padding"),
        count_include_pad=False,
    )


def _global_pool_options(config: LayerConfig) -> dict:
    return {"keepdims": bool(config.get("keepdims", False))}


def _zero_padding_options(config: LayerConfig) -> dict:
    pad = config.get("padding", 1)
    if isinstance(pad, int):
        pad = [[pad, pad], [pad, pad]]
    elif len(pad) == 2 and all(isinstance(p, int) for p in pad):
        pad = [[pad[0], pad[0]], [pad[1], pad[1]]]
    return {"padding": tuple((int(lo), int(hi)) for lo, hi in pad)}


def _merge(combine: Callable[[list], jax.Array]) -> LayerRule:
    """A merge layer: no options, no weights, two or more inputs of one shape."""
    return LayerRule(_no_options, lambda layer, xs, precision: combine(xs), inputs="two or more")


_KERNEL_BIAS = {"kernel": ("params", "kernel"), "bias": ("params", "bias")}

LAYERS: dict[str, LayerRule] = {
    "InputLayer": LayerRule(_input_options, lambda layer, x, precision: x, inputs="any"),
    "Conv2D": LayerRule(_conv2d_options, _conv2d, weights=_KERNEL_BIAS),
    "Dense": LayerRule(_dense_options, _dense, weights=_KERNEL_BIAS),
    "BatchNormalization": LayerRule(
        _batch_norm_options,
        _batch_norm,
        weights={
            "gamma": ("params", "scale"),
            "beta": ("params", "bias"),
            "moving_mean": ("batch_stats", "mean"),
            "moving_variance": ("batch_stats", "var"),
        },
    ),
    "Activation": LayerRule(
        _activation_options,
        lambda layer, x, precision: _ACTIVATIONS[layer.option("activation")](x),
    ),
    "Add": _merge(lambda xs: sum(xs[1:], xs[0])),
    "Subtract": _merge(lambda xs: xs[0] - xs[1]),
    "Multiply": _merge(lambda xs: functools.reduce(operator.mul, xs)),
    "Average": _merge(lambda xs: sum(xs[1:], xs[0]) / len(xs)),
    "Maximum": _merge(lambda xs: jnp.max(jnp.stack(xs), axis=0)),
    "Minimum": _merge(lambda xs: jnp.min(jnp.stack(xs), axis=0)),
    "Concatenate": LayerRule(
        lambda config: {"axis": int(config.get("axis", -1))},
        lambda layer, xs, precision: jnp.concatenate(xs, axis=layer.option("axis")),
        inputs="two or more",
    ),
    "MaxPooling2D": LayerRule(
        _pool_options,
        lambda layer, x, precision: nn.max_pool(
            x, layer.option("pool_size"), layer.option("strides"), layer.option("padding")
        ),
    ),
    "AveragePooling2D": LayerRule(_pool_options, _average_pool),
    "GlobalAveragePooling2D": LayerRule(
        _global_pool_options,
        lambda layer, x, precision: jnp.mean(x, axis=(1, 2), keepdims=layer.option("keepdims")),
    ),
    "GlobalMaxPooling2D": LayerRule(
        _global_pool_options,
        lambda layer, x, precision: jnp.max(x, axis=(1, 2), keepdims=layer.option("keepdims")),
    ),
    # Row-major over [H, W, C], as Keras channels_last.
    "Flatten": LayerRule(_no_options, lambda layer, x, precision: x.reshape(x.shape[0], -1)),
    "Dropout": LayerRule(_no_options, lambda layer, x, precision: x),
    "ZeroPadding2D": LayerRule(
        _zero_padding_options,
        lambda layer, x, precision: jnp.pad(x, ((0, 0), *layer.option("padding"), (0, 0))),
    ),
}


# ---------------------------------------------------------------------------------------------
# The graph and the loader


class KerasGraph(nn.Module):
    """A Keras graph evaluated in topological order; layer names are the Keras names."""

    layers: tuple[KerasLayer, ...]  # topological order; layers[0] is the InputLayer
    output_name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, images):
        # [N, H, W, 3] pixels 0-255 -> normalised, as the Keras models saw them.
        x = jnp.asarray(images, jnp.float32)
        x = (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)
        outputs = {self.layers[0].name: x}
        for layer in self.layers[1:]:
            rule = LAYERS[layer.class_name]
            inputs = [outputs[name] for name in layer.inputs]
            if rule.inputs == "two or more":  # a merge takes the list
                outputs[layer.name] = rule.apply(layer, inputs, self.precision)
            else:
                (x,) = inputs
                outputs[layer.name] = rule.apply(layer, x, self.precision)
        return outputs[self.output_name]


def load_keras_model(path: str) -> LoadedModel:
    """Loads a Keras 2.x HDF5 model saved with `model.save()` as a Flax `LoadedModel`."""
    importing.check_file("keras", path, "a Keras .h5 file")
    if not h5py.is_hdf5(path):
        raise _error(path, "not an HDF5 file (expected a Keras 2 .h5 file written by model.save())")
    try:
        with h5py.File(path, "r") as h5:
            contents = _read_file(h5, path)
    except InputError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise _error(
            path,
            f"corrupt or truncated HDF5 file ({err}); expected a complete Keras 2 .h5 file "
            "written by model.save()",
        ) from err
    config, raw_weights, attrs = contents

    try:
        layers, class_name, num_config_layers = _parse_model_config(config, path)
    except InputError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
        raise _error(
            path,
            f"malformed model_config ({type(err).__name__}: {err}); expected a Keras 2.x "
            "Sequential or functional Model config",
        ) from err
    layers, output_name = _drop_final_softmax(layers, path)
    image_shape = _image_shape(layers[0], path)
    normalization = _normalization(attrs.get("normalization"), path)
    module = KerasGraph(
        layers=layers,
        output_name=output_name,
        mean=normalization["mean"],
        std=normalization["std"],
    )
    # Shape inference through the whole graph gives the variable shapes to expect.
    dummy = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    try:
        expected = jax.eval_shape(module.init, jax.random.key(0), dummy)
        output = jax.eval_shape(module.apply, expected, dummy)
    except (TypeError, ValueError) as err:  # InputError included
        raise _error(
            path, f"the layers do not fit together on a {list(image_shape)} input: {err}"
        ) from err
    if output.ndim != 2:
        raise _error(
            path,
            f"output layer {output_name!r} gives shape {tuple(output.shape)}; "
            "expected [batch, classes]",
        )
    variables = _assemble_variables(layers, raw_weights, expected, path)

    def apply_fn(params, images):
        """[N, H, W, 3] float pixels 0-255 -> logits [N, num_classes]."""
        return module.apply(params, images)

    return importing.loaded_model(
        "keras",
        path,
        apply_fn=apply_fn,
        params=variables,
        image_shape=image_shape,
        num_classes=int(output.shape[-1]),
        input_meta={
            "normalization": {
                "mean": list(normalization["mean"]),
                "std": list(normalization["std"]),
                "from": normalization["from"],
            }
        },
        meta={
            "keras_version": attrs.get("keras_version"),
            "backend": attrs.get("backend"),
            "architecture": {"class_name": class_name, "num_layers": num_config_layers},
            "output_layer": output_name,
        },
    )


def _text(value) -> str:
    """An HDF5 string attribute as str (Keras 2 writes str or bytes)."""
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    return value.decode("utf-8") if isinstance(value, bytes | np.bytes_) else str(value)


def _read_file(h5: h5py.File, path: str):
    """Reads the config, the root attributes and every layer's weights into NumPy."""
    attrs = {}
    for key in ("keras_version", "backend", "normalization"):
        if key in h5.attrs:
            attrs[key] = _text(h5.attrs[key])
    if attrs.get("backend") == "theano":
        raise _error(
            path,
            "saved with the theano backend, whose convolution kernels "
            "are flipped; expected a tensorflow-backend file",
        )
    version = attrs.get("keras_version")
    if version is not None and not version.startswith("2."):
        raise _error(path, f"keras_version {version}; expected a Keras 2.x HDF5 file")
    if "model_config" not in h5.attrs:
        raise _error(
            path,
            "no 'model_config' attribute (a weights-only file?); "
            "expected a full model saved with model.save()",
        )
    try:
        config = json.loads(_text(h5.attrs["model_config"]))
    except json.JSONDecodeError as err:
        raise _error(path, f"'model_config' is not valid JSON ({err})") from err
    root = h5["model_weights"] if "model_weights" in h5 else h5
    raw_weights = {}  # layer name -> {weight basename: array}
    for layer_name, group in root.items():
        if isinstance(group, h5py.Group):
            raw_weights[layer_name] = _read_layer_weights(group, layer_name, path)
    return config, raw_weights, attrs


def _read_layer_weights(group: h5py.Group, layer_name: str, path: str) -> dict[str, np.ndarray]:
    """A layer group's weights by basename ('kernel', 'gamma', ...), in `weight_names` order."""
    datasets = {}  # relative path -> dataset
    group.visititems(
        lambda name, obj: datasets.__setitem__(name, obj) if isinstance(obj, h5py.Dataset) else None
    )
    if "weight_names" in group.attrs:
        names = [_text(name) for name in np.atleast_1d(group.attrs["weight_names"])]
        chosen = []
        for name in names:
            if name in datasets:
                chosen.append(name)
                continue
            same_base = [key for key in datasets if _basename(key) == _basename(name)]
            if len(same_base) != 1:
                raise _error(
                    path,
                    f"layer {layer_name!r} lists weight {name!r} in "
                    f"weight_names, but its group holds {sorted(datasets) or 'no datasets'}",
                )
            chosen.append(same_base[0])
    else:
        chosen = sorted(datasets)
    weights = {}
    for key in chosen:
        base = _basename(key)
        if base in weights:
            raise _error(path, f"layer {layer_name!r} has two weights named {base!r}")
        weights[base] = np.asarray(datasets[key][()])
    return weights


def _basename(name: str) -> str:
    """'conv2d_1/kernel:0' -> 'kernel'."""
    return name.rsplit("/", 1)[-1].split(":", 1)[0]


def _parse_model_config(config: Any, path: str) -> tuple[tuple[KerasLayer, ...], str, int]:
    """(layers in topological order, model class name, number of layers in the config)."""
    if not isinstance(config, dict) or "class_name" not in config or "config" not in config:
        raise _error(
            path,
            "model_config is not a Keras model config "
            "(expected {'class_name': ..., 'config': ...})",
        )
    class_name = config["class_name"]
    body = config["config"]
    if class_name == "Sequential":
        layer_configs = body if isinstance(body, list) else body.get("layers", [])
        return _parse_sequential(layer_configs, path), class_name, len(layer_configs)
    if class_name in ("Model", "Functional"):
        return _parse_functional(body, path), class_name, len(body.get("layers", []))
    raise _error(
        path,
        f"model class {class_name!r} is not supported; expected a Sequential or functional Model",
    )


def _parse_sequential(layer_configs: list, path: str) -> tuple[KerasLayer, ...]:
    if not layer_configs:
        raise _error(path, "the Sequential model has no layers")
    first = layer_configs[0]
    if first.get("class_name") == "InputLayer":
        input_layer = _parse_layer(first, (), path)
        layer_configs = layer_configs[1:]
    else:  # Keras 2.1: the input shape lives on the first layer
        first_config = first.get("config", {})
        input_layer = KerasLayer(
            name=f"{first_config.get('name', 'layer')}_input",
            class_name="InputLayer",
            inputs=(),
            options=(("shape", _batch_input_shape(first_config, path)),),
        )
    layers = [input_layer]
    for layer_config in layer_configs:
        layers.append(_parse_layer(layer_config, (layers[-1].name,), path))
    _check_unique_names(layers, path)
    return tuple(layers)


def _parse_functional(body: dict, path: str) -> tuple[KerasLayer, ...]:
    inputs, outputs = body.get("input_layers", []), body.get("output_layers", [])
    if len(inputs) != 1 or len(outputs) != 1:
        raise _error(
            path,
            f"{len(inputs)} inputs and {len(outputs)} outputs; "
            "expected a model with one input and one output",
        )
    by_name = {}
    for layer_config in body.get("layers", []):
        name = layer_config.get("name") or layer_config.get("config", {}).get("name")
        nodes = layer_config.get("inbound_nodes", [])
        if len(nodes) > 1:
            raise _error(
                path,
                f"layer {name!r} is called {len(nodes)} times (a shared "
                "layer); expected each layer to be used once",
            )
        sources = []
        for ref in nodes[0] if nodes else []:
            if not isinstance(ref, list) or ref[1:3] != [0, 0]:
                raise _error(
                    path,
                    f"layer {name!r} has inbound node {ref!r}; expected the "
                    "Keras 2 form [layer_name, 0, 0, kwargs]",
                )
            sources.append(ref[0])
        if name in by_name:
            raise _error(path, f"two layers are named {name!r}")
        by_name[name] = _parse_layer(layer_config, tuple(sources), path)
    input_name, output_name = inputs[0][0], outputs[0][0]
    for name in (input_name, output_name):
        if name not in by_name:
            raise _error(path, f"model input/output {name!r} is not a layer")

    # The layers the output depends on ...
    needed, stack = set(), [(output_name, "<model output>")]
    while stack:
        name, consumer = stack.pop()
        if name not in by_name:
            raise _error(path, f"layer {consumer!r} takes input from unknown layer {name!r}")
        if name not in needed:
            needed.add(name)
            stack.extend((source, name) for source in by_name[name].inputs)
    # ... in topological order.
    graph = {name: by_name[name].inputs for name in by_name if name in needed}
    try:
        order = [by_name[name] for name in graphlib.TopologicalSorter(graph).static_order()]
    except graphlib.CycleError as err:
        raise _error(path, f"the graph has a cycle through {err.args[1]}") from err
    roots = [layer.name for layer in order if not layer.inputs]
    if roots != [input_name] or order[0].class_name != "InputLayer":
        raise _error(
            path,
            f"the output depends on layers without inputs {roots}; "
            f"expected only the InputLayer {input_name!r}",
        )
    return tuple(order)


def _check_unique_names(layers: list[KerasLayer], path: str):
    names = [layer.name for layer in layers]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise _error(path, f"duplicate layer names {duplicates}")


def _parse_layer(layer_config: dict, inputs: tuple[str, ...], path: str) -> KerasLayer:
    """Validates one layer's config with its rule and keeps the options inference needs."""
    kind = layer_config.get("class_name")
    config = layer_config.get("config", {})
    name = config.get("name") or layer_config.get("name")
    config = LayerConfig(kind, name, config, path)
    if config.get("data_format", "channels_last") != "channels_last":
        config.fail(f"data_format {config['data_format']!r}; expected 'channels_last'")
    rule = LAYERS.get(kind)
    if rule is None:
        raise _error(
            path,
            f"layer {name!r} of class {kind!r} is not supported; "
            f"supported layers: {', '.join(LAYERS)}",
        )
    options = rule.parse(config)
    count = len(inputs)
    if (rule.inputs == "one" and count != 1) or (rule.inputs == "two or more" and count < 2):
        config.fail(f"{count} inputs; expected {rule.inputs}")
    return KerasLayer(name, kind, inputs, tuple(options.items()))


def _batch_input_shape(config: dict, path: str) -> tuple:
    shape = config.get("batch_input_shape") or config.get("batch_shape")
    if shape is None:
        raise _error(
            path,
            f"the input layer {config.get('name')!r} has no "
            "batch_input_shape; expected [null, H, W, 3]",
        )
    return tuple(shape)


def _image_shape(input_layer: KerasLayer, path: str) -> tuple[int, int, int]:
    shape = input_layer.option("shape")
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]) or shape[3] != 3:
        raise _error(
            path, f"input shape {list(shape)}; expected [null, H, W, 3] (RGB images, channels last)"
        )
    return (shape[1], shape[2], shape[3])


def _drop_final_softmax(
    layers: tuple[KerasLayer, ...], path: str
) -> tuple[tuple[KerasLayer, ...], str]:
    """Makes the output layer's softmax the identity, so the graph returns logits."""
    output = layers[-1]
    options = dict(output.options)
    if options.get("activation") != "softmax":
        raise _error(
            path,
            f"the output layer {output.name!r} ({output.class_name}, "
            f"activation {options.get('activation', 'none')!r}) is not a softmax; expected a "
            "classifier ending in Dense(activation='softmax') or Activation('softmax')",
        )
    options["activation"] = "linear"
    output = dataclasses.replace(output, options=tuple(options.items()))
    return (*layers[:-1], output), output.name


def _normalization(attr: str | None, path: str) -> dict:
    if attr is None:
        return {**DEFAULT_NORMALIZATION, "from": "default (CIFAR-10 training set)"}
    try:
        stats = json.loads(attr)
        mean = tuple(float(v) for v in stats["mean"])
        std = tuple(float(v) for v in stats["std"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise _error(
            path,
            f"bad 'normalization' attribute {attr!r}; expected JSON "
            '{"mean": [r, g, b], "std": [r, g, b]}',
        ) from err
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise _error(
            path, f"'normalization' attribute {attr!r}; expected 3 means and 3 positive stds"
        )
    return {"mean": mean, "std": std, "from": "file attribute 'normalization'"}


def _assemble_variables(
    layers: tuple[KerasLayer, ...], raw_weights: dict, expected: dict, path: str
) -> dict:
    """Maps each layer's Keras weights onto the Flax variables, checking names and shapes."""
    variables = {collection: {} for collection in expected}
    for layer in layers:
        mapping = LAYERS[layer.class_name].weights
        if not mapping:
            continue
        wanted = {
            keras_name: target
            for keras_name, target in mapping.items()
            if layer.name in expected.get(target[0], {})
            and target[1] in expected[target[0]][layer.name]
        }
        if layer.name not in raw_weights:
            raise _error(
                path,
                f"no weights for {layer.class_name} layer {layer.name!r} "
                f"(expected model_weights/{layer.name}/ with {sorted(wanted)})",
            )
        found = raw_weights[layer.name]
        missing = sorted(set(wanted) - set(found))
        unexpected = sorted(set(found) - set(wanted))
        if missing or unexpected:
            raise _error(
                path,
                f"{layer.class_name} layer {layer.name!r} has weights "
                f"{sorted(found)}; expected {sorted(wanted)}",
            )
        for keras_name, (collection, flax_name) in wanted.items():
            want_shape = tuple(expected[collection][layer.name][flax_name].shape)
            array = found[keras_name]
            if array.shape != want_shape:
                raise _error(
                    path,
                    f"{layer.class_name} layer {layer.name!r} weight "
                    f"{keras_name!r} has shape {array.shape}; the model config implies "
                    f"{want_shape}",
                )
            if not np.issubdtype(array.dtype, np.floating):
                raise _error(
                    path,
                    f"layer {layer.name!r} weight {keras_name!r} has "
                    f"dtype {array.dtype}; expected floats",
                )
            variables[collection].setdefault(layer.name, {})[flax_name] = jnp.asarray(
                array, jnp.float32
            )
    return variables
