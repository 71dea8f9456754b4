"""Models behind one interface: `apply_fn(params, images) -> logits`.

Images enter as float RGB pixels in [0, 255], shape [N, H, W, 3]; every model
normalises its own input. A model is chosen by a spec string:

- `keras:PATH.h5`: a Keras HDF5 model imported into Flax.
- `ckpt:PATH`: a checkpoint written by `scripts/train.py` (see `models.checkpoint`).
- `alexnet:PATH`: BVLC AlexNet weights (`.npz` converted, or `.npy` with allow_pickle).
- `onnx:PATH.onnx`: an ONNX image classifier (e.g. from `torch.onnx.export`); its input
  convention (scale, mean, std, channel order) comes from `input_convention`.
- `random:NAME`: a zoo architecture (nin, allconv, vgg16, alexnet, lenet5) with random
  weights, seed 0. Only for benchmarks and tests: it is not a trained model.

The modules form one chain, each importing only those before it: `base`
(the interface, constants) and `convention` (input conventions) <- `layers` <- the
architectures (`nin`, `allconv`, `vgg`, `alexnet`, `lenet5`) <- `zoo` (the registry) <- the
loaders (`checkpoint`, `alexnet_weights`, and `keras_import` and `onnx_import` over
`importing`, what the file importers share) <- this package (`load_model`).
`model_card` renders a checkpoint's `model.json` as markdown.
"""

from __future__ import annotations

from opa_jax.errors import InputError
from opa_jax.models import alexnet_weights, checkpoint, keras_import, onnx_import, zoo
from opa_jax.models.base import CIFAR10_CLASSES, LoadedModel

__all__ = ["CIFAR10_CLASSES", "LoadedModel", "load_model"]

KINDS = ("keras", "ckpt", "alexnet", "onnx", "random")


def load_model(
    spec: str,
    *,
    allow_pickle: bool = False,
    onnx=None,
    input_convention=None,
    image_size: tuple[int, int] | None = None,
) -> LoadedModel:
    """Loads a model from a spec string (see the module docstring).

    `input_convention` (`opa_jax.models.convention.InputConvention`) and `image_size`
    (H, W for graphs with a dynamic image size) concern `onnx:` models only. `onnx`, a
    run config's `onnx` section (configs/default.py), sets both in their place; it is
    checked whatever the model's kind, as the rest of a config is.
    """
    if onnx is not None:
        options = onnx_import.load_options(onnx)
        input_convention, image_size = options["input_convention"], options["image_size"]
    kind, sep, arg = spec.partition(":")
    if not sep or not arg:
        raise InputError(
            f"model spec {spec!r}: expected KIND:ARG with KIND one of {', '.join(KINDS)} "
            "(e.g. 'keras:../shared/data/keras/lenet.h5' or 'random:nin')"
        )
    if kind == "keras":
        return keras_import.load_keras_model(arg)
    if kind == "ckpt":
        return checkpoint.load_model_checkpoint(arg)
    if kind == "alexnet":
        return alexnet_weights.load_alexnet(arg, allow_pickle=allow_pickle)
    if kind == "onnx":
        return onnx_import.load_onnx_model(arg, input_convention, image_size)
    if kind == "random":
        return zoo.random_model(arg)
    raise InputError(
        f"model spec {spec!r}: unknown kind {kind!r}; expected one of {', '.join(KINDS)}"
    )
