"""What every model shares: the `LoadedModel` interface, CIFAR-10 constants, the
jitted inference function of a Flax module, and the checks of loaded variables.

Images enter as float pixels in [0, 255], shape [N, H, W, C] with the model's
channel count C (`image_shape[-1]`: 3 for RGB, 1 for grayscale); every model
normalises its own input and returns logits.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from opa_jax.errors import InputError

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
# Per-channel RGB pixel mean and standard deviation of the CIFAR-10 training set.
CIFAR10_MEAN = (125.307, 122.95, 113.865)
CIFAR10_STD = (62.9932, 62.0887, 66.7048)
# The MNIST training set's pixel mean and standard deviation (one channel).
MNIST_MEAN = (0.1307 * 255,)  # 0.1307 and 0.3081 of [0, 1] pixels
MNIST_STD = (0.3081 * 255,)
MNIST_CLASSES = tuple(str(digit) for digit in range(10))
PRECISIONS = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready for the attack: a pure apply function and its parameters."""

    name: str  # the spec it was loaded from
    apply_fn: Callable[[Any, Any], Any]  # (params, images [N,H,W,C] f32 0-255) -> logits
    params: Any  # pytree; includes batch-norm statistics (inference mode)
    image_shape: tuple[int, int, int]  # (H, W, C): the attack follows its channel count C
    num_classes: int
    class_names: tuple[str, ...] | None = None
    meta: dict = dataclasses.field(default_factory=dict)
    # The Flax module behind `apply_fn` when it is `make_apply_fn(module)` (the zoo and its
    # checkpoints): bfloat16 rebuilds it with bfloat16 compute, since a module whose
    # `dtype` is float32 casts bfloat16 parameters and inputs back to float32.
    module: nn.Module | None = dataclasses.field(default=None, compare=False, repr=False)

    def with_precision(self, precision: str) -> LoadedModel:
        """The model with bfloat16 parameters, inputs and compute when asked (products
        accumulate in float32 where XLA does so); logits stay float32."""
        if precision not in PRECISIONS:
            raise InputError(f"precision={precision!r}: expected float32 or bfloat16")
        if precision == "float32":
            return self
        apply_fn = self.apply_fn
        module = self.module
        if module is not None and hasattr(module, "dtype"):
            module = module.clone(dtype=jnp.bfloat16)
            apply_fn = make_apply_fn(module)

        def apply_bf16(params, images):
            cast = jax.tree.map(
                lambda p: p.astype(jnp.bfloat16) if p.dtype == jnp.float32 else p, params
            )
            return apply_fn(cast, images.astype(jnp.bfloat16)).astype(jnp.float32)

        return dataclasses.replace(
            self, apply_fn=apply_bf16, name=self.name + "@bf16", module=module
        )


@functools.lru_cache(maxsize=64)
def make_apply_fn(module: nn.Module):
    """`apply_fn(variables, images) -> logits` in inference mode (batch-norm running stats).

    Jitted, and one per module (modules are hashable), so equal models share
    compilations; it can also be called inside another jit (the attack's step).
    """

    @jax.jit
    def apply_fn(variables, images):
        # images: [N, H, W, C] float 0-255 -> logits [N, num_classes] float32
        return module.apply(variables, jnp.asarray(images, jnp.float32), train=False)

    return apply_fn


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(module: nn.Module, key, image_shape: tuple[int, int, int]):
    return module.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)


def init_variables(module: nn.Module, key, image_shape: tuple[int, int, int]):
    """Variables (params and, with batch norm, batch_stats) for one image shape.

    Compiled once per (module, image shape): the random initialisers are slow to
    compile on the CPU.
    """
    return _init(module, key, tuple(image_shape))


def variable_shapes(module: nn.Module, image_shape: tuple[int, int, int]):
    """The variables' shapes and dtypes, without computing them."""
    return jax.eval_shape(_init, module, jax.random.key(0), tuple(image_shape))


def count_params(variables) -> int:
    """Number of trainable parameters (the `params` collection)."""
    return sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))


def check_variables(variables, expected, what: str) -> None:
    """InputError unless `variables` has exactly the leaves and shapes of `expected`."""
    got = traverse_util.flatten_dict(variables, sep="/")
    want = traverse_util.flatten_dict(serialization.to_state_dict(expected), sep="/")
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    mismatched = [
        f"{k} {tuple(np.shape(got[k]))} (expected {tuple(want[k].shape)})"
        for k in sorted(set(got) & set(want))
        if tuple(np.shape(got[k])) != tuple(want[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", mismatched),
        ):
            if items:
                more = f" and {len(items) - 5} more" if len(items) > 5 else ""
                parts.append(f"{label}: {', '.join(items[:5])}{more}")
        raise InputError(f"{what}: the weights do not fit the architecture; {'; '.join(parts)}")
