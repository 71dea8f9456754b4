"""What the file importers (`keras_import`, `onnx_import`) share: the error prefix that
names the file, the check that the file exists, and the `LoadedModel` they return.

Every error about an imported file reads `KIND model 'PATH': what is wrong; what was
expected`, e.g. `keras model 'lenet.h5': file not found (expected a Keras .h5 file)`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax

from opa_jax.errors import InputError
from opa_jax.models.base import CIFAR10_CLASSES, LoadedModel


def error(kind: str, path: str, message: str) -> InputError:
    """An `InputError` about the file `path` of a `kind` ('keras', 'onnx') model."""
    return InputError(f"{kind} model {path!r}: {message}")


def check_file(kind: str, path: str, expected: str) -> None:
    """InputError unless `path` is an existing file; `expected` says what it should be."""
    if not os.path.exists(path):
        raise error(kind, path, f"file not found (expected {expected})")
    if not os.path.isfile(path):
        raise error(kind, path, f"not a file (expected {expected})")


def loaded_model(
    kind: str,
    path: str,
    *,
    apply_fn: Callable[[Any, Any], Any],
    params: Any,
    image_shape: tuple[int, int, int],
    num_classes: int,
    input_meta: dict,
    meta: dict,
) -> LoadedModel:
    """The model named `KIND:PATH`, with CIFAR-10's class names when it has 10 classes.

    Its meta holds the file's absolute path (or `<memory>`), `input_meta` (how the images are
    prepared), the parameter count, then the importer's own `meta`.
    """
    return LoadedModel(
        name=f"{kind}:{path}",
        apply_fn=apply_fn,
        params=params,
        image_shape=image_shape,
        num_classes=num_classes,
        class_names=CIFAR10_CLASSES if num_classes == 10 else None,
        meta={
            "source": path if path.startswith("<") else os.path.abspath(path),  # <memory>
            **input_meta,
            "param_count": int(sum(leaf.size for leaf in jax.tree.leaves(params))),
            **meta,
        },
    )
