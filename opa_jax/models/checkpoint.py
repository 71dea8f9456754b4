"""Trained models as self-describing directories.

A model checkpoint is a directory holding

- `variables.msgpack`: the Flax variables (params and batch_stats) as
  `flax.serialization` msgpack, optionally stored as float16/bfloat16;
- `model.json`: the architecture name and its options, image shape, class
  names, the weights' dtype and SHA-256, and whatever the writer adds (dataset,
  measured accuracies, training config, seed, software versions).

`load_model_checkpoint` rebuilds the architecture from `model.json`, checks
that every variable is present with the expected shape, and restores float32.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from opa_jax import files, provenance
from opa_jax.errors import InputError
from opa_jax.models import zoo
from opa_jax.models.base import LoadedModel, check_variables, make_apply_fn, variable_shapes

MODEL_JSON = "model.json"
VARIABLES_FILE = "variables.msgpack"
FORMAT = "opa_jax.model_checkpoint"
FORMAT_VERSION = 1
WEIGHTS_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": jnp.bfloat16}


def _to_storage(variables, weights_dtype: str):
    """Host numpy copies; floating leaves cast to the storage dtype."""
    dtype = WEIGHTS_DTYPES[weights_dtype]

    def cast(x):
        x = np.asarray(x)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree_util.tree_map(cast, serialization.to_state_dict(variables))


def save_model_checkpoint(
    path: str,
    name: str,
    variables,
    meta: dict[str, Any] | None = None,
    *,
    weights_dtype: str = "float32",
) -> None:
    """Writes `variables` of zoo architecture `name` to the directory `path`.

    `meta` is stored in model.json. Its keys `model_config` (the `zoo.build`
    overrides, e.g. {"width": 0.5, "num_classes": 10}), `class_names` and
    `image_shape` describe the model; other keys (dataset, accuracies,
    train_config, seed, ...) are recorded as given.
    """
    if weights_dtype not in WEIGHTS_DTYPES:
        raise InputError(
            f"weights_dtype={weights_dtype!r}: expected one of {', '.join(WEIGHTS_DTYPES)}"
        )
    meta = dict(meta or {})
    arch = zoo.get_architecture(name)
    model_config = dict(meta.pop("model_config", {}) or {})
    zoo.build(name, **model_config)  # fails early on options the architecture lacks
    state = _to_storage(variables, weights_dtype)
    data = serialization.msgpack_serialize(state)
    num_params = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(state.get("params", {})))
    description = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": name,
        "model_config": model_config,
        "image_shape": list(meta.pop("image_shape", arch.image_shape)),
        "num_classes": int(model_config.get("num_classes", arch.num_classes)),
        "class_names": list(meta.pop("class_names", arch.class_names) or []) or None,
        "num_params": num_params,
        "weights_file": VARIABLES_FILE,
        "weights_dtype": weights_dtype,
        "weights_sha256": hashlib.sha256(data).hexdigest(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "software": provenance.software_versions(),
        **meta,
    }
    files.write_atomic(os.path.join(path, VARIABLES_FILE), data)
    text = json.dumps(description, indent=2, default=_json_default) + "\n"
    files.write_atomic(os.path.join(path, MODEL_JSON), text)


def _json_default(obj):
    if isinstance(obj, np.generic | np.ndarray):
        return obj.tolist()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def read_model_json(path: str) -> dict[str, Any]:
    """The checkpoint's description; InputError when missing or unreadable."""
    if not os.path.isdir(path):
        raise InputError(f"model checkpoint {path!r}: no such directory")
    json_path = os.path.join(path, MODEL_JSON)
    if not os.path.isfile(json_path):
        raise InputError(
            f"model checkpoint {path!r}: no {MODEL_JSON} (expected a directory written by "
            "scripts/train.py, e.g. <workdir>/model)"
        )
    try:
        with open(json_path) as f:
            description = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"model checkpoint {path!r}: {MODEL_JSON} is corrupt ({e})") from e
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise InputError(f"model checkpoint {path!r}: {MODEL_JSON} is not an opa_jax model")
    return description


def load_model_checkpoint(path: str) -> LoadedModel:
    """Loads a model checkpoint directory as a `LoadedModel` (float32, inference mode)."""
    description = read_model_json(path)
    name = description.get("model")
    try:
        module = zoo.build(name, **(description.get("model_config") or {}))
    except InputError as e:
        raise InputError(f"model checkpoint {path!r}: {e}") from e
    weights_path = os.path.join(path, description.get("weights_file", VARIABLES_FILE))
    try:
        with open(weights_path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"model checkpoint {path!r}: cannot read the weights ({e})") from e
    digest = description.get("weights_sha256")
    if digest and hashlib.sha256(data).hexdigest() != digest:
        raise InputError(
            f"model checkpoint {path!r}: {os.path.basename(weights_path)} is corrupt "
            "(its SHA-256 differs from the one in model.json)"
        )
    try:
        state = serialization.msgpack_restore(data)
    except Exception as e:
        raise InputError(f"model checkpoint {path!r}: the weights file is corrupt ({e})") from e
    if not isinstance(state, dict):
        raise InputError(f"model checkpoint {path!r}: the weights file holds no variables")
    image_shape = tuple(description.get("image_shape") or zoo.get_architecture(name).image_shape)
    expected = variable_shapes(module, image_shape)
    check_variables(state, expected, f"model checkpoint {path!r} (architecture {name!r})")
    variables = jax.tree_util.tree_map(
        lambda x, ref: jnp.asarray(x, ref.dtype), state, serialization.to_state_dict(expected)
    )
    class_names = description.get("class_names")
    return LoadedModel(
        name=f"ckpt:{path}",
        apply_fn=make_apply_fn(module),
        params=variables,
        image_shape=image_shape,
        num_classes=int(description.get("num_classes", zoo.get_architecture(name).num_classes)),
        class_names=tuple(class_names) if class_names else None,
        meta=description,
        module=module,
    )
