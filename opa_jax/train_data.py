"""What a training step sees: the splits in memory, each epoch's order, the
augmentation, and progressive resizing's image sizes.

A split is decoded once into memory (uint8) and, with a cache directory, kept as
.npy files for later runs. The example order of an epoch is a function of
(seed, epoch) alone, and an image's augmentation of the step's key, so that a
resumed run sees the data an uninterrupted one does.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from opa_jax import data
from opa_jax.errors import InputError


def load_split(spec: str, split: str, image_shape, cache_dir: str = ""):
    """A whole split in memory: images uint8 [N, H, W, 3], labels int32 [N], class names.

    With `cache_dir`, the decoded arrays are kept as .npy files keyed by the spec,
    split and shape, so later runs skip decoding.
    """
    cache_base = None
    if cache_dir:
        key = json.dumps([spec, os.path.abspath(spec.partition(":")[2]), split, list(image_shape)])
        stem = f"{split}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        cache_base = os.path.join(cache_dir, stem)
        if os.path.exists(cache_base + ".json"):
            with open(cache_base + ".json") as f:
                info = json.load(f)
            images = np.load(cache_base + "-images.npy")
            labels = np.load(cache_base + "-labels.npy")
            logging.info("%s %s: %d images from cache %s", spec, split, len(labels), cache_base)
            return images, labels, tuple(info["class_names"])

    dataset = data.load_dataset(spec, split, image_shape=tuple(image_shape))
    images = np.empty((len(dataset), *image_shape), np.uint8)  # [N, H, W, 3]
    chunk = 5000
    start_time = time.time()
    for start in range(0, len(dataset), chunk):
        stop = min(start + chunk, len(dataset))
        images[start:stop] = dataset.read(range(start, stop))
        logging.info("%s %s: decoded %d/%d images", spec, split, stop, len(dataset))
    logging.info("%s %s: decoding took %.1fs", spec, split, time.time() - start_time)
    labels = np.asarray(dataset.labels, np.int32)
    if cache_base:
        os.makedirs(cache_dir, exist_ok=True)
        np.save(cache_base + "-images.npy", images)
        np.save(cache_base + "-labels.npy", labels)
        with open(cache_base + ".json", "w") as f:
            json.dump({"spec": spec, "split": split, "class_names": dataset.class_names}, f)
    return images, labels, tuple(dataset.class_names)


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The example order of one epoch: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def resizing_phases(spec: str, image_shape, total_steps: int) -> tuple[tuple[int, tuple], ...]:
    """`config.progressive_resizing` ("SIZE:UNTIL,...", e.g. "16:0.35,24:0.6": train on
    images resized to 16 pixels high until 35% of the steps, then 24 until 60%, then at
    the native size) as ((end step, (height, width)), ...) for the phases before the
    native one; () for "". A width follows its height in the image's aspect ratio.

    InputError when the spec is malformed, a size is not below the native height, or
    the fractions do not increase within (0, 1).
    """
    if not spec.strip():
        return ()
    height, width = image_shape[:2]
    expected = (
        f"expected SIZE:UNTIL,... with whole sizes below the native height {height} and "
        "fractions of the steps increasing within (0, 1), e.g. '16:0.35,24:0.6'"
    )
    phases, last = [], 0.0
    for part in spec.split(","):
        try:
            size_text, until_text = part.split(":")
            size, until = int(size_text), float(until_text)
        except ValueError:
            raise InputError(f"config.progressive_resizing={spec!r}: {expected}") from None
        if not (0 < size < height and last < until < 1):
            raise InputError(f"config.progressive_resizing={spec!r}: {expected}")
        last = until
        phases.append((round(until * total_steps), (size, max(round(size * width / height), 1))))
    return tuple(phases)


def augment_image(key, image, padding: int):
    """Random crop after zero-padding by `padding`, and a random horizontal flip."""
    crop_key, flip_key = jax.random.split(key)
    height, width, _ = image.shape
    padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    top, left = jax.random.randint(crop_key, (2,), 0, 2 * padding + 1)
    crop = jax.lax.dynamic_slice(padded, (top, left, 0), image.shape)
    return jnp.where(jax.random.bernoulli(flip_key), crop[:, ::-1], crop)
