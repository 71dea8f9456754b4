"""What a run attacks, decided before any attack: the model, the images and the work items.

`make_plan(config)` loads the model and the dataset, runs the clean pass (the
model's own predictions, to keep the correctly classified images) and lists
the work items: one per image, or one per (image, target class) when
targeted. `Plan.describe` is what `--dry_run` prints.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from opa_jax import attack, devices, incremental, search
from opa_jax import data as data_lib
from opa_jax.errors import InputError
from opa_jax.models import LoadedModel, load_model

CLEAN_BATCH = 256  # images per clean-pass model call
de_config = search.de_config  # the DE settings of a config


def clean_pass(
    model: LoadedModel,
    dataset: data_lib.Dataset,
    positions: Sequence[int],
    wanted: int,
    only_correct: bool = True,
) -> tuple[list[int], dict[int, np.ndarray]]:
    """The first `wanted` eligible positions (correctly classified, if `only_correct`)
    and the clean probabilities of every position checked on the way.

    The model sees the images in batches, and only until enough are found.
    """
    eligible, clean_probs = [], {}
    for start in range(0, len(positions), CLEAN_BATCH):
        chunk = positions[start : start + CLEAN_BATCH]
        probs = attack.predict_probs(model, dataset.read(chunk))
        for position, prob in zip(chunk, probs, strict=True):
            clean_probs[int(position)] = prob
            if not only_correct or prob.argmax() == dataset.labels[position]:
                eligible.append(int(position))
        if len(eligible) >= wanted:
            break
    return eligible[:wanted], clean_probs


def considered_positions(
    positions: Sequence[int], eligible: Sequence[int], wanted: int
) -> list[int]:
    """The positions a run considers: the selection up to its last eligible position
    when `wanted` were found (the misclassified ones skipped on the way included),
    else the whole selection."""
    positions = [int(p) for p in positions]
    if len(eligible) < wanted or not eligible:
        return positions
    return positions[: positions.index(eligible[-1]) + 1]


def target_classes(config, num_classes: int) -> list[int]:
    """The target classes of a targeted run: `config.targets`, 'all' or a comma list."""
    if config.targets == "all":
        return list(range(num_classes))
    try:
        targets = [int(t) for t in str(config.targets).split(",")]
    except ValueError as e:
        raise InputError(f"targets={config.targets!r}: expected 'all' or class indices") from e
    bad = [t for t in targets if not 0 <= t < num_classes]
    if bad:
        raise InputError(f"targets: classes {bad} are not in [0, {num_classes})")
    return targets


def work_items(
    dataset: data_lib.Dataset, positions: Sequence[int], targets: Sequence[int] | None
) -> attack.WorkItems:
    """One item per position, or one per (position, target other than its label)."""
    if targets is None:
        rows = [(p, -1) for p in positions]
    else:
        rows = [(p, t) for p in positions for t in targets if t != dataset.labels[p]]
    chosen = np.asarray([r[0] for r in rows], np.int64)
    return attack.WorkItems(
        positions=chosen,
        indices=dataset.indices[chosen] if len(chosen) else np.zeros(0, np.int64),
        true_labels=dataset.labels[chosen] if len(chosen) else np.zeros(0, np.int32),
        target_labels=np.asarray([r[1] for r in rows], np.int32),
    )


@dataclasses.dataclass(frozen=True)
class Plan:
    """A run's model, dataset, DE settings, work items and execution sizes."""

    model: LoadedModel
    dataset: data_lib.Dataset
    search: search.Search | None  # the search rule; None for FGSM
    items: attack.WorkItems  # this host's share
    clean_probs: dict[int, np.ndarray]  # dataset position -> clean probabilities [C]
    images_checked: int  # by the clean pass
    eligible_images: int
    # Clean and robust accuracy's denominator (opa_jax.metrics): the selection up to the
    # last eligible image (all of it when fewer are eligible than wanted), and the
    # correctly classified images among those.
    images_considered: int
    clean_correct: int
    evaluator: Any  # how candidates are evaluated (opa_jax.incremental); None for FGSM
    slots: int  # in-flight images per device
    chunk_size: int  # queue items per device and loop call

    def describe(self, config: ml_collections.ConfigDict) -> dict:
        """The resolved config and plan, as `--dry_run` prints them."""
        local_devices = jax.local_devices()
        return {
            "config": json.loads(config.to_json()),
            "de": search.settings(self.search),
            "model": {
                "name": self.model.name,
                "image_shape": self.model.image_shape,
                "num_classes": self.model.num_classes,
            },
            "dataset": {"name": self.dataset.name, "size": len(self.dataset)},
            "images_checked": self.images_checked,
            "eligible_images": self.eligible_images,
            "images_considered": self.images_considered,
            "clean_correct": self.clean_correct,
            "work_items": len(self.items),
            "devices": [str(d) for d in local_devices],
            "evaluator": self.evaluator.name if self.evaluator else None,
            "slots_per_device": self.slots,
            "chunk_size_per_device": self.chunk_size,
            "chunks": -(-len(self.items) // (self.chunk_size * len(local_devices))),
        }


def make_plan(config: ml_collections.ConfigDict) -> Plan:
    """Loads model and data and decides what to attack (no attack is run)."""
    if config.method not in search.METHODS:
        raise InputError(f"method={config.method!r}: expected one of {search.METHODS}")
    model = load_model(config.model, allow_pickle=config.allow_pickle, onnx=config.get("onnx"))
    model = model.with_precision(config.precision)
    dataset = data_lib.load_dataset(
        config.data, config.split, model.image_shape, config.resize, config.data_dir or None
    )
    if len(dataset.class_names) != model.num_classes:
        raise InputError(
            f"dataset {config.data} has {len(dataset.class_names)} classes but model "
            f"{config.model} has {model.num_classes} outputs"
        )
    positions = data_lib.select(dataset, config.selection)
    if config.num_images < 0:
        raise InputError(f"num_images={config.num_images}: expected >= 0 (0 means all)")
    wanted = config.num_images or len(positions)
    eligible, clean_probs = clean_pass(model, dataset, positions, wanted, config.only_correct)
    considered = considered_positions(positions, eligible, wanted)
    clean_correct = sum(int(clean_probs[p].argmax() == dataset.labels[p]) for p in considered)
    rule = (
        search.search_config(config, model.image_shape)
        if config.method in search.SEARCH_METHODS
        else None
    )
    targets = target_classes(config, model.num_classes) if config.targeted else None
    items = work_items(dataset, eligible, targets)
    # Multi-host: each process attacks its own share.
    items = items.select(slice(jax.process_index(), None, jax.process_count()))
    evaluator = (
        incremental.make_evaluator(config.evaluator, model, rule.num_pixels) if rule else None
    )
    slots, chunk_size = devices.slots_and_chunk(
        config, model, rule.popsize if rule else 1, len(items), evaluator
    )
    return Plan(
        model=model,
        dataset=dataset,
        search=rule,
        items=items,
        clean_probs=clean_probs,
        images_checked=len(clean_probs),
        eligible_images=len(eligible),
        images_considered=len(considered),
        clean_correct=clean_correct,
        evaluator=evaluator,
        slots=slots,
        chunk_size=chunk_size,
    )
