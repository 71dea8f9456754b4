"""Baselines the one-pixel attack is compared with (Su et al. 2019, Sec. V).

Random search needs no code here: it is the `random` DE preset (fresh samples
from the paper's initial distribution every generation, with DE's query
budget). FGSM (Goodfellow et al. 2015) is a white-box, dense L-inf attack: one
gradient of the cross-entropy per image, every pixel moved by `epsilon`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from opa_jax import attack as attack_lib
from opa_jax.errors import InputError


@dataclasses.dataclass
class FGSMResults(attack_lib.Results):
    """FGSM results. `perturbation` is empty ([R, 0, 5]): FGSM changes many pixels, and
    these say how many and by how much instead."""

    l0_pixels: np.ndarray = None  # [R] pixel positions (row, column) with any channel changed
    linf: np.ndarray = None  # [R] largest change of any channel, pixel units 0-255


def fgsm_image(apply_fn, params, image, label, direction, epsilon):
    """One image's FGSM step. image [H, W, 3] float 0-255; direction +1 ascends the loss
    of `label` (non-targeted: the true class), -1 descends it (targeted: the target).

    Returns the adversarial image (clipped to [0, 255], rounded to integers, so it is a
    real image), the model's probabilities on it, and whether every logit (clean and
    adversarial) was finite.
    """

    def loss(x):
        logits = apply_fn(params, x[None])[0].astype(jnp.float32)
        return -jax.nn.log_softmax(logits)[label], jnp.all(jnp.isfinite(logits))

    gradient, clean_finite = jax.grad(loss, has_aux=True)(image)  # [H, W, 3]
    adversarial = jnp.round(jnp.clip(image + direction * epsilon * jnp.sign(gradient), 0, 255))
    logits = apply_fn(params, adversarial[None])[0].astype(jnp.float32)
    finite = clean_finite & jnp.all(jnp.isfinite(logits))
    return adversarial, jax.nn.softmax(logits), finite


@functools.lru_cache(maxsize=16)
def _compiled_fgsm(apply_fn):
    def batch(params, images, true_labels, target_labels, epsilon):
        # images [B, H, W, 3] uint8; target_labels -1 where non-targeted.
        images = images.astype(jnp.float32)
        targeted = target_labels >= 0
        labels = jnp.where(targeted, target_labels, true_labels)
        direction = jnp.where(targeted, -1.0, 1.0)
        one = functools.partial(fgsm_image, apply_fn, params, epsilon=epsilon)
        adversarial, probs, finite = jax.vmap(one)(
            images, labels, direction
        )  # [B, H, W, 3], [B, C]
        adv_label = probs.argmax(-1)
        success = jnp.where(targeted, adv_label == target_labels, adv_label != true_labels)
        change = jnp.abs(adversarial - images)  # [B, H, W, 3]
        l0_pixels = jnp.sum(jnp.any(change > 0, axis=-1), axis=(1, 2))
        linf = jnp.max(change, axis=(1, 2, 3))
        return success, probs, l0_pixels, linf, finite

    return jax.jit(batch)


def fgsm_results(
    model,
    items: attack_lib.WorkItems,
    read_images: Callable[[Sequence[int]], np.ndarray],
    epsilon: float,
    batch_size: int = 128,
) -> Iterator[FGSMResults]:
    """FGSM on every work item, in fixed-size batches (the last one padded), one gradient
    per image. Yields one `FGSMResults` per batch, rows in item order."""
    if not epsilon > 0:
        raise InputError(f"fgsm.epsilon={epsilon}: expected > 0 (pixel units, 0-255 scale)")
    step = _compiled_fgsm(model.apply_fn)
    image_shape = tuple(model.image_shape)
    for start in range(0, len(items), batch_size):
        rows = np.arange(start, min(start + batch_size, len(items)))
        images = read_images(items.positions[rows])
        if images.shape[1:] != image_shape:
            raise InputError(
                f"images have shape {images.shape[1:]}, but model {model.name} "
                f"expects {image_shape}"
            )
        pad = batch_size - len(rows)  # static shapes: one compilation for every batch

        def padded(x, pad=pad):
            return np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])

        success, probs, l0_pixels, linf, finite = jax.device_get(
            step(
                model.params,
                padded(np.asarray(images, np.uint8)),
                padded(items.true_labels[rows].astype(np.int32)),
                padded(items.target_labels[rows].astype(np.int32)),
                np.float32(epsilon),
            )
        )
        n = len(rows)
        if not np.all(finite[:n]):
            raise InputError(
                f"model {model.name} returned NaN or infinite logits during FGSM (items "
                f"{rows[~finite[:n]].tolist()[:10]}); check the weights and the input normalisation"
            )
        yield FGSMResults(
            work_ids=rows,
            success=success[:n],
            perturbation=np.zeros((n, 0, 5)),
            adv_probs=probs[:n],
            generations=np.ones(n, np.int32),  # one step
            queries=np.ones(n, np.int32),  # one gradient (forward and backward pass)
            l0_pixels=l0_pixels[:n],
            linf=linf[:n],
        )
