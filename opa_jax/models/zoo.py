"""The paper's model zoo (Su, Vargas & Sakurai, Sec. 4): the registry by name.

`ARCHITECTURES` maps a name to its Flax module class and defaults; `build`
makes a module with field overrides; `random_model` gives a seed-0 random
initialisation behind the attack's `LoadedModel` interface (benchmarks and
tests only: it is not a trained model).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax

from opa_jax.errors import InputError
from opa_jax.models.alexnet import AlexNet
from opa_jax.models.allconv import AllConv
from opa_jax.models.base import (
    CIFAR10_CLASSES,
    MNIST_CLASSES,
    LoadedModel,
    init_variables,
    make_apply_fn,
)
from opa_jax.models.lenet5 import LeNet5
from opa_jax.models.nin import NiN
from opa_jax.models.vgg import VGG16


@dataclasses.dataclass(frozen=True)
class Architecture:
    module: type[nn.Module]
    image_shape: tuple[int, int, int]  # (H, W, C)
    num_classes: int
    class_names: tuple[str, ...] | None
    description: str


ARCHITECTURES: dict[str, Architecture] = {
    "nin": Architecture(NiN, (32, 32, 3), 10, CIFAR10_CLASSES, "Network in Network, CIFAR-10"),
    "allconv": Architecture(AllConv, (32, 32, 3), 10, CIFAR10_CLASSES, "All-CNN-C, CIFAR-10"),
    "vgg16": Architecture(VGG16, (32, 32, 3), 10, CIFAR10_CLASSES, "VGG16 (BN, fc 2048), CIFAR-10"),
    "alexnet": Architecture(AlexNet, (227, 227, 3), 1000, None, "BVLC AlexNet, ImageNet"),
    "lenet5": Architecture(LeNet5, (28, 28, 1), 10, MNIST_CLASSES, "LeNet-5, MNIST, grayscale"),
}


def get_architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise InputError(
            f"unknown model architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[name]


def module_fields(name: str) -> tuple[str, ...]:
    """The fields `build` accepts as overrides for an architecture."""
    module = get_architecture(name).module
    return tuple(f.name for f in dataclasses.fields(module) if f.name not in ("parent", "name"))


def build(name: str, **overrides) -> nn.Module:
    """The architecture `name` as a module, with dataclass-field overrides (e.g. width=0.5)."""
    arch = get_architecture(name)
    known = module_fields(name)
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise InputError(f"model {name!r}: unknown option(s) {unknown}; known: {', '.join(known)}")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return arch.module(**fields)


def random_model(name: str) -> LoadedModel:
    """Architecture `name` with seed-0 random weights; for benchmarks and tests only."""
    arch = get_architecture(name)
    module = build(name)
    variables = init_variables(module, jax.random.key(0), arch.image_shape)
    return LoadedModel(
        name=f"random:{name}",
        apply_fn=make_apply_fn(module),
        params=variables,
        image_shape=arch.image_shape,
        num_classes=arch.num_classes,
        class_names=arch.class_names,
        meta={"architecture": name, "random_init_seed": 0, "trained": False},
        module=module,
    )
