"""The Python API: attack your own model, in memory or as a whole run, and keep the images.

    import opa_jax

    model = opa_jax.Model.from_flax(module, variables, image_shape=(32, 32, 3),
                                    input_convention=opa_jax.InputConvention(scale=1 / 255))
    result = opa_jax.attack_images(model, images, labels, pixels=1, preset="paper",
                                   popsize=100, seed=0)
    result.records      # the records of results.jsonl, one dict per attack
    result.columns()    # the same as columns: pandas.DataFrame(result.columns())
    result.export("adv", "png")   # the successful adversarial images

It runs the CLI's own engine: the same `Attacker` (DE loop, sharding over every
local device on a `data` mesh axis), the same record builder, the same keys (an
image's random stream is keyed by its index), so an image attacked here with the
same seed and index gets the record `scripts/attack.py` writes for it.

The model convention: the attack hands the model float pixels 0-255,
`[N, H, W, C]` (RGB: C = 3; grayscale: 1; `image_shape` says which).
`Model.from_function` / `from_flax` wrap a function of another
input (e.g. `[0, 1]` pixels, normalised, NCHW) with an `InputConvention` and a
layout, and take logits, or probabilities (then their log is used as logits).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from opa_jax import attack as attack_lib
from opa_jax import de, export, incremental, metrics
from opa_jax import devices as devices_lib
from opa_jax import workdir as workdir_lib
from opa_jax.errors import InputError
from opa_jax.models import LoadedModel, load_model
from opa_jax.models.convention import InputConvention

LAYOUTS = ("nhwc", "nchw")
OUTPUTS = ("logits", "probabilities")


@dataclasses.dataclass(frozen=True)
class Model(LoadedModel):
    """A model for the attack: `apply_fn(params, images [N, H, W, 3] pixels 0-255) -> logits`."""

    @classmethod
    def from_function(
        cls,
        fn: Callable[[Any, Any], Any],
        params: Any,
        *,
        image_shape: tuple[int, int, int],
        num_classes: int | None = None,
        input_convention: InputConvention | None = None,
        layout: str = "nhwc",
        outputs: str = "logits",
        class_names: Sequence[str] | None = None,
        name: str = "function",
    ) -> Model:
        """Wraps `fn(params, x) -> [N, C]`, a pure JAX function.

        `x` is what `fn` was written for: `input_convention` maps pixels 0-255 to it
        (default: the pixels as they are), `layout` "nchw" transposes to [N, 3, H, W].
        `outputs` says whether `fn` returns logits or probabilities. `num_classes`
        is checked against (or, when None, taken from) `fn`'s output shape.
        """
        convention = input_convention or InputConvention()
        if layout not in LAYOUTS:
            raise InputError(f"layout={layout!r}: expected one of {LAYOUTS}")
        if outputs not in OUTPUTS:
            raise InputError(f"outputs={outputs!r}: expected one of {OUTPUTS}")
        image_shape = tuple(int(d) for d in image_shape)
        if len(image_shape) != 3 or image_shape[2] < 1:
            raise InputError(f"image_shape={list(image_shape)}: expected (H, W, C), e.g. (H, W, 3)")
        convention = convention.for_channels(image_shape[2])

        def apply_fn(params, images):
            """[N, H, W, 3] float pixels 0-255 -> logits [N, C]."""
            x = convention.apply(images)
            if layout == "nchw":
                x = jnp.transpose(x, (0, 3, 1, 2))
            out = fn(params, x)
            if outputs == "probabilities":  # softmax(log p) = p: the attack sees p again
                out = jnp.log(jnp.maximum(out, jnp.finfo(jnp.float32).tiny))
            return jnp.asarray(out, jnp.float32)

        try:
            out = jax.eval_shape(
                apply_fn, params, jax.ShapeDtypeStruct((2, *image_shape), jnp.float32)
            )
        except (TypeError, ValueError, flax.errors.FlaxError) as err:
            raise InputError(
                f"model {name!r} does not run on [N, {', '.join(map(str, image_shape))}] "
                f"images: {err}"
            ) from err
        if out.ndim != 2 or out.shape[0] != 2:
            raise InputError(
                f"model {name!r} returns shape {list(out.shape)} for 2 images; expected "
                "[2, num_classes]"
            )
        if num_classes is not None and out.shape[1] != num_classes:
            raise InputError(
                f"model {name!r} returns {out.shape[1]} classes; num_classes={num_classes}"
            )
        if class_names is not None and len(class_names) != out.shape[1]:
            raise InputError(
                f"model {name!r}: {len(class_names)} class names for {out.shape[1]} classes"
            )
        return cls(
            name=name,
            apply_fn=apply_fn,
            params=params,
            image_shape=image_shape,
            num_classes=int(out.shape[1]),
            class_names=tuple(class_names) if class_names is not None else None,
            meta={"input_convention": convention.as_dict(), "layout": layout, "outputs": outputs},
        )

    @classmethod
    def from_flax(
        cls,
        module,
        variables: Any,
        *,
        image_shape: tuple[int, int, int],
        apply_kwargs: dict | None = None,
        name: str | None = None,
        **options,
    ) -> Model:
        """A Flax linen module and its variables (params, batch_stats, ...), in inference
        mode: `module.apply(variables, x, **apply_kwargs)`, e.g. `apply_kwargs={"train":
        False}`. Other options as in `from_function`."""
        kwargs = dict(apply_kwargs or {})

        def fn(variables, x):
            return module.apply(variables, x, **kwargs)

        name = name or f"flax:{type(module).__name__}"
        return cls.from_function(fn, variables, image_shape=image_shape, name=name, **options)

    @classmethod
    def from_torch(
        cls,
        module,
        image_shape: tuple[int, int, int],
        *,
        input_convention: InputConvention | str | None = None,
        exporter: str = "torchscript",
        opset: int | None = None,
        name: str | None = None,
    ) -> Model:
        """A PyTorch module (NCHW input, logits or probabilities out), exported to ONNX in
        memory and run by the ONNX importer; needs `pip install 'opa_jax[torch]'`.

        `image_shape` (H, W, C) or (C, H, W), e.g. (32, 32, 3). `input_convention`: what the module
        takes, an `InputConvention` or a name ("unit": [0, 1] pixels, "imagenet",
        "cifar10", ...; default: pixels 0-255 as they are). `exporter`: "torchscript"
        (`dynamo=False`, opset 17 unless `opset`) or "dynamo" (needs onnxscript).
        The module is exported in eval mode and left in the mode it was in.
        """
        from opa_jax.models import torch_export

        loaded = torch_export.load_torch_model(
            module,
            image_shape,
            input_convention=input_convention,
            exporter=exporter,
            opset=opset,
            name=name,
        )
        return cls(**{f.name: getattr(loaded, f.name) for f in dataclasses.fields(LoadedModel)})

    @classmethod
    def load(cls, spec: str, **options) -> Model:
        """A model spec as on the command line (`onnx:model.onnx`, `keras:x.h5`, `ckpt:DIR`,
        ...); `options` as `opa_jax.models.load_model` takes them."""
        loaded = load_model(spec, **options)
        return cls(**{f.name: getattr(loaded, f.name) for f in dataclasses.fields(LoadedModel)})


@dataclasses.dataclass
class AttackResult:
    """What `attack_images` found: one record per attack, as results.jsonl holds them."""

    records: list[dict]
    summary: dict  # success rate, clean and robust accuracy, confidence, ... (opa_jax.metrics)
    model: Any = dataclasses.field(repr=False)
    images: np.ndarray = dataclasses.field(repr=False)  # [N, H, W, C] the inputs
    positions: dict = dataclasses.field(repr=False)  # record's image index -> row of `images`

    def columns(self) -> dict[str, list]:
        """The records as columns: `pandas.DataFrame(result.columns())`."""
        keys = list(self.records[0]) if self.records else []
        return {key: [record.get(key) for record in self.records] for key in keys}

    def to_dataframe(self):
        """The records as a pandas DataFrame (pandas is not a dependency of opa_jax)."""
        try:
            import pandas
        except ImportError as err:
            raise ImportError("to_dataframe needs pandas: pip install pandas") from err
        return pandas.DataFrame(self.columns())

    def adversarial_images(self) -> tuple[np.ndarray, list[dict]]:
        """The successful attacks' images, rebuilt and checked against the model:
        ([R, H, W, 3] float32 pixels 0-255, their records)."""
        records = [r for r in self.records if r["success"]]
        source = self.images[[self.positions[r["image"]] for r in records]]
        adversarial = export.apply_perturbations(source, records)
        if records:
            export.check_labels(self.model, adversarial, records, f"model {self.model.name}")
        return adversarial, records

    def export(self, out: str, fmt: str = "png") -> dict:
        """Writes the successful attacks' images as `scripts/export_adversarial.py` does."""
        adversarial, records = self.adversarial_images()
        return export.write(out, fmt, adversarial, records, self.model.class_names)


def _pixels(images, image_shape) -> np.ndarray:
    """Images as the engine holds them: uint8 pixels 0-255, [N, H, W, C]."""
    images = np.asarray(images)
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(image_shape):
        raise InputError(
            f"images of shape {list(images.shape)}; the model expects [N, "
            f"{', '.join(map(str, image_shape))}]"
        )
    if images.dtype == np.uint8:
        return images
    if (
        not np.issubdtype(images.dtype, np.number)
        or images.size
        and (images.min() < 0 or images.max() > 255 or not np.array_equal(images, np.round(images)))
    ):
        raise InputError(
            "images: expected pixels 0-255 (uint8, or floats with integer values in [0, 255]); "
            "the model's input convention maps them to what it was trained on"
        )
    return images.astype(np.uint8)


def _work_items(
    model: LoadedModel, labels, indices, eligible, targeted, targets, target_labels
) -> attack_lib.WorkItems:
    """`attack_images`' (image, target) pairs over the `eligible` rows: one per image
    with `target_labels` [N], every class of `targets` but the true one when
    `targeted`, else one untargeted pair."""
    n = len(labels)
    if target_labels is not None:
        target_labels = np.asarray(target_labels, np.int64)
        if target_labels.shape != (n,):
            raise InputError(f"target_labels: expected {n} class indices, one per image")
        rows = [(p, int(target_labels[p])) for p in eligible]
    elif targeted:
        classes = range(model.num_classes) if targets == "all" else [int(t) for t in targets]
        rows = [(p, t) for p in eligible for t in classes if t != labels[p]]
    else:
        rows = [(p, -1) for p in eligible]
    bad = sorted({t for _, t in rows if not -1 <= t < model.num_classes})
    if bad:
        raise InputError(f"targets: classes {bad} are not in [0, {model.num_classes})")
    positions = np.asarray([p for p, _ in rows], np.int64)
    return attack_lib.WorkItems(
        positions=positions,
        indices=indices[positions],
        true_labels=labels[positions].astype(np.int32),
        target_labels=np.asarray([t for _, t in rows], np.int32),
    )


def attack_images(
    model: LoadedModel,
    images,
    labels,
    *,
    pixels: int = 1,
    targeted: bool = False,
    targets: str | Sequence[int] = "all",
    target_labels=None,
    preset: str = "paper",
    seed: int = 0,
    devices=None,
    only_correct: bool = True,
    indices=None,
    slots: int = 0,
    chunk_size: int = 0,
    evaluator: str = "auto",
    **de_fields,
) -> AttackResult:
    """Attacks in-memory images with the CLI's engine; returns its records.

    images [N, H, W, C] pixels 0-255 (uint8, or floats with integer values); labels [N].
    - `targeted`: attack every class in `targets` ("all", or class indices) other than
      the true one; or give `target_labels` [N], one target per image (implies targeted).
    - `preset` ("paper", "scipy", "random") and any DE field as a keyword (`popsize=100`,
      `generations=20`, `stop="argmax"`, ...); `pixels` perturbed per image.
    - `seed` and `indices` [N] (the images' dataset indices; default 0..N-1) key each
      image's random stream, as in a run.
    - `only_correct`: attack only images the model classifies correctly (the paper's rule).
    - `devices`: the JAX devices to shard over (default: every local device); `slots`
      and `chunk_size` per device, 0 = chosen as a run chooses them; `evaluator`
      ("auto", "full" or "incremental") as `config.evaluator` in a run.
    """
    images = _pixels(images, model.image_shape)
    labels = np.asarray(labels).astype(np.int64)
    n = len(images)
    if labels.shape != (n,) or (n and not (0 <= labels.min() and labels.max() < model.num_classes)):
        raise InputError(
            f"labels: expected {n} class indices in [0, {model.num_classes}); got shape "
            f"{list(labels.shape)}"
        )
    indices = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
    if indices.shape != (n,) or len(set(indices.tolist())) != n:
        raise InputError(f"indices: expected {n} distinct image indices")
    overrides = de_fields
    known = {f.name for f in dataclasses.fields(de.DEConfig)} - {"num_pixels", "channels"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise InputError(f"unknown DE field(s) {unknown}; known: {', '.join(sorted(known))}")
    channels = de.image_channels(model.image_shape)
    config = de.DEConfig.from_preset(preset, num_pixels=pixels, channels=channels, **overrides)

    clean = attack_lib.predict_probs(model, images.astype(np.float32))
    eligible = np.flatnonzero(clean.argmax(-1) == labels) if only_correct else np.arange(n)
    items = _work_items(model, labels, indices, eligible, targeted, targets, target_labels)
    targeted = targeted or target_labels is not None

    devices = list(devices or jax.local_devices())
    per_device_items = max(1, -(-len(items) // len(devices)))
    evaluator = incremental.make_evaluator(evaluator, model, pixels)
    slots = slots or min(devices_lib.auto_slots(model, config.popsize, evaluator), per_device_items)
    attacker = attack_lib.Attacker(model, config, bool(targeted), slots, devices, evaluator)
    record_config = ml_collections.ConfigDict(
        {"pixels": pixels, "model": model.name, "method": "de", "de": {"preset": preset}}
    )
    records = []
    if len(items):
        batches = attacker.run(
            jax.random.key(seed), items, lambda p: images[p], chunk_size or 4 * slots
        )
        for res in batches:
            records += [
                workdir_lib.record(record_config, items, clean, res, i)
                for i in range(len(res.work_ids))
            ]
    order = {
        (int(i), None if t < 0 else int(t)): k
        for k, (i, t) in enumerate(zip(items.indices, items.target_labels, strict=True))
    }
    records.sort(key=lambda r: order[(r["image"], r["target_label"])])
    # Every image given is considered: clean and robust accuracy are over all N.
    correct = int(np.sum(clean.argmax(-1) == labels))
    tally = metrics.Tally(model.num_classes, images_considered=n, clean_correct=correct)
    summary = tally.update(records).summary()
    return AttackResult(
        records=records,
        summary=summary,
        model=model,
        images=images,
        positions={int(index): p for p, index in enumerate(indices)},
    )


def run_attack(config: ml_collections.ConfigDict, workdir: str, dry_run: bool = False) -> dict:
    """A whole, resumable run from a config (configs/default.py and its variants), as
    `scripts/attack.py` does; returns the summary. Results go to `workdir`."""
    from opa_jax import run

    return run.run_attack(config, workdir, dry_run=dry_run)


def export_adversarial(workdir: str, out: str, fmt: str = "png") -> dict:
    """The successful attacks of a run's workdir as PNG files or one .npz (opa_jax.export)."""
    return export.export_workdir(workdir, out, fmt)


def set_cpu_devices(count: int = 0) -> None:
    """Splits a CPU host into `count` XLA devices (0: one per core); call before JAX starts."""
    devices_lib.set_cpu_devices(count)
