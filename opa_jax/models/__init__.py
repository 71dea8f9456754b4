"""Models behind one interface: `apply_fn(params, images) -> logits`.

Images enter as float RGB pixels in [0, 255], shape [N, H, W, 3]; every model
normalises its own input. A model is chosen by a spec string:

- `keras:PATH.h5`: a Keras HDF5 model imported into Flax.
- `ckpt:PATH`: a checkpoint written by `scripts/train.py` (see `opa_jax.checkpoint`).
- `alexnet:PATH`: BVLC AlexNet weights (`.npz` converted, or `.npy` with allow_pickle).
- `random:NAME`: a zoo architecture (nin, allconv, vgg16, alexnet) with random
  weights, seed 0. Only for benchmarks and tests: it is not a trained model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from opa_jax.errors import InputError

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready for the attack: a pure apply function and its parameters."""

    name: str  # the spec it was loaded from
    apply_fn: Callable[[Any, Any], Any]  # (params, images [N,H,W,3] f32 0-255) -> logits [N,C]
    params: Any  # pytree; includes batch-norm statistics (inference mode)
    image_shape: tuple[int, int, int]  # (H, W, 3)
    num_classes: int
    class_names: tuple[str, ...] | None = None
    meta: dict = dataclasses.field(default_factory=dict)


def load_model(spec: str, *, allow_pickle: bool = False) -> LoadedModel:
    """Loads a model from a spec string (see the module docstring)."""
    kind, sep, arg = spec.partition(":")
    if not sep or not arg:
        raise InputError(
            f"model spec {spec!r}: expected KIND:ARG with KIND one of keras, ckpt, alexnet, random "
            "(e.g. 'keras:../shared/data/keras/lenet.h5' or 'random:nin')"
        )
    if kind == "keras":
        from opa_jax.models import keras_import

        return keras_import.load_keras_model(arg)
    if kind == "ckpt":
        from opa_jax import checkpoint

        return checkpoint.load_model_checkpoint(arg)
    if kind == "alexnet":
        from opa_jax.models import alexnet

        return alexnet.load_alexnet(arg, allow_pickle=allow_pickle)
    if kind == "random":
        from opa_jax.models import zoo

        return zoo.random_model(arg)
    raise InputError(
        f"model spec {spec!r}: unknown kind {kind!r}; expected one of keras, ckpt, alexnet, random"
    )
