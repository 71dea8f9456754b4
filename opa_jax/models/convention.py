"""How a foreign model wants its input: pixel scale, per-channel mean and std, channel order.

The attack hands every model float RGB pixels 0-255, `[N, H, W, 3]`. A model
imported from ONNX, or wrapped from a user's function, may expect something
else, e.g. torchvision's `(pixels / 255 - mean) / std`. An `InputConvention`
states that mapping once, and `apply` performs it inside the model's
`apply_fn`, so the attack still perturbs pixels in 0-255.

    model input = (pixels[..., order] * scale - mean) / std

An image of C channels other than 3 (grayscale: C = 1) takes a mean and std of
one value (for every channel) or of C values, e.g. MNIST's `mean=(0.1307,)`,
`std=(0.3081,)` after `scale=1/255`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from opa_jax.errors import InputError

CHANNEL_ORDERS = ("rgb", "bgr")


@dataclasses.dataclass(frozen=True)
class InputConvention:
    """The model input as a function of float RGB pixels 0-255 (see the module docstring)."""

    scale: float = 1.0  # 1/255 for models that take [0, 1] pixels
    # In scaled units, model channel order: one value per channel, or one for all.
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    channel_order: str = "rgb"  # "bgr": channels reversed before mean and std (Caffe models)

    def __post_init__(self):
        if self.channel_order not in CHANNEL_ORDERS:
            raise InputError(
                f"channel_order={self.channel_order!r}: expected one of {CHANNEL_ORDERS}"
            )
        if not self.scale > 0:
            raise InputError(f"scale={self.scale}: expected a positive number")
        for field, values in (("mean", self.mean), ("std", self.std)):
            if len(values) < 1:
                raise InputError(f"{field}={list(values)}: expected one value per channel")
        if min(self.std) <= 0:
            raise InputError(f"std={list(self.std)}: expected positive values")

    def for_channels(self, channels: int) -> InputConvention:
        """The convention for a C-channel input: a mean or std of equal values (the
        defaults, `unit`) becomes one value for all channels; any other must give one
        value per channel, or one for all."""
        fields = {}
        for field, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != channels and len(set(values)) == 1:
                values = values[:1]
            if len(values) not in (1, channels):
                raise InputError(
                    f"{field}={list(values)}: the model's input has {channels} channel(s); "
                    "expected one value per channel, or one for all"
                )
            fields[field] = tuple(values)
        return dataclasses.replace(self, **fields)

    @property
    def is_identity(self) -> bool:
        return self == InputConvention()

    def apply(self, images):
        """[N, H, W, C] float pixels 0-255 -> the model's input, same shape."""
        x = jnp.asarray(images, jnp.float32)
        if self.channel_order == "bgr":
            x = x[..., ::-1]
        if self.scale != 1.0:
            x = x * jnp.float32(self.scale)
        if any(self.mean):
            x = x - jnp.asarray(self.mean, jnp.float32)
        if any(s != 1.0 for s in self.std):
            x = x / jnp.asarray(self.std, jnp.float32)
        return x

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"mean": list(self.mean), "std": list(self.std)}


# Named conventions for the usual training pipelines.
NAMED = {
    # The pixels as they are: float 0-255, RGB. For graphs that carry their own
    # preprocessing, and for the zoo's own models.
    "none": InputConvention(),
    # [0, 1] pixels (torchvision's ToTensor() and nothing else).
    "unit": InputConvention(scale=1 / 255),
    # torchvision's ImageNet models: ToTensor(), Normalize(mean, std).
    "imagenet": InputConvention(
        scale=1 / 255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
    ),
    # CIFAR-10 training-set statistics after ToTensor().
    "cifar10": InputConvention(
        scale=1 / 255, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)
    ),
    # The std found in most PyTorch CIFAR-10 training scripts (kuangliu/pytorch-cifar
    # and its many copies): the mean of the per-image stds, not the pixel std.
    "cifar10_legacy": InputConvention(
        scale=1 / 255, mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010)
    ),
    # The one-pixel-attack-keras models: per-channel statistics in pixel units.
    "keras_cifar10": InputConvention(
        mean=(125.307, 122.95, 113.865), std=(62.9932, 62.0887, 66.7048)
    ),
}


def named(name: str) -> InputConvention:
    if name not in NAMED:
        raise InputError(f"input normalization {name!r}: expected one of {sorted(NAMED)}")
    return NAMED[name]


def _floats(text: str, field: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in str(text).replace(" ", "").strip("()[]").split(","))
    except ValueError as err:
        raise InputError(
            f"{field}={text!r}: expected comma-separated numbers, one per channel"
        ) from err


def from_config(config) -> InputConvention:
    """The convention of a config's `onnx` section (configs/default.py); None gives 'none'.

    `normalization` names a starting point; `scale`, `mean`, `std` and
    `channel_order`, when set, replace its fields.
    """
    if config is None:
        return NAMED["none"]
    base = named(config.get("normalization") or "none")
    fields = {}
    if config.get("scale") is not None:
        fields["scale"] = float(config.scale)
    for field in ("mean", "std"):
        if config.get(field):
            fields[field] = _floats(config[field], f"onnx.{field}")
    if config.get("channel_order"):
        fields["channel_order"] = config.channel_order
    return dataclasses.replace(base, **fields)
