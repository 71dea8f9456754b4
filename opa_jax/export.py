"""The adversarial images of a run, rebuilt from its records and exported.

A record keeps the perturbation as applied (`[pixels, 5]`: row, column, r, g,
b; `[pixels, 2 + C]` for C channels, e.g. row, column, v for grayscale), not
the image. Each successful attack's image is rebuilt from the source image and
that perturbation, and the model is asked again: it must still give the
recorded adversarial label, or the export stops with an InputError (a
different model, data or preprocessing than the run's).

Two formats:
- `png`: `OUT/<split>/<true class name>/<index>_adv<label>[_target<t>].png`, the
  layout of a `folder:` dataset, so the export reads back as one (labelled by the
  true class, e.g. for adversarial training); a one-channel image as a grayscale PNG;
- `npz`: `OUT/adversarial.npz` with `images` [R, H, W, C], `indices`,
  `true_labels`, `adv_labels`, `target_labels` (-1 when non-targeted),
  `perturbations` [R, pixels, 2 + C] and `class_names`.
"""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np

from opa_jax import attack as attack_lib
from opa_jax.errors import InputError

FORMATS = ("png", "npz")
PATH_KINDS = ("keras", "ckpt", "alexnet", "onnx", "folder")  # specs whose argument is a path
NPZ_FILE = "adversarial.npz"


def apply_perturbations(images: np.ndarray, records: list[dict]) -> np.ndarray:
    """Each record's pixels written into its source image, as the engine does (float32).

    images [R, H, W, C] pixels 0-255 -> [R, H, W, C] float32."""
    adversarial = np.array(images, np.float32, copy=True)
    genes = 2 + adversarial.shape[-1]  # row, column and one value per channel
    for image, record in zip(adversarial, records, strict=True):
        pixels = np.asarray(record["perturbation"], np.float64).reshape(-1, genes)
        if not len(pixels):
            raise InputError(
                f"record of image {record['image']} (method {record.get('method')}) has no "
                "pixel perturbation; only pixel attacks (method de) can be exported"
            )
        for row, col, *rgb in pixels:
            image[int(row), int(col)] = rgb
    return adversarial


def check_labels(model, adversarial: np.ndarray, records: list[dict], source: str) -> None:
    """The model must give each rebuilt image its recorded adversarial label."""
    probs = attack_lib.predict_probs(model, adversarial)
    wrong = [
        (record["image"], record["target_label"], record["adv_label"], int(label))
        for record, label in zip(records, probs.argmax(-1), strict=True)
        if label != record["adv_label"]
    ]
    if wrong:
        image, target, recorded, got = wrong[0]
        raise InputError(
            f"{source}: {len(wrong)} of {len(records)} rebuilt adversarial images are not "
            f"classified as recorded (first: image {image}, target {target}: recorded "
            f"{recorded}, model now gives {got}); expected the run's model, data and input "
            "convention"
        )


def write(out: str, fmt: str, adversarial, records, class_names, split: str = "test") -> dict:
    """Writes rebuilt images in `fmt` (see the module docstring); returns what was written."""
    if fmt not in FORMATS:
        raise InputError(f"format={fmt!r}: expected one of {FORMATS}")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise InputError(f"export directory {out!r} cannot be created ({err})") from err
    integral = np.array_equal(adversarial, np.round(adversarial))
    if integral:
        adversarial = np.clip(adversarial, 0, 255).astype(np.uint8)
    targets = np.asarray([-1 if r["target_label"] is None else r["target_label"] for r in records])
    if fmt == "npz":
        path = os.path.join(out, NPZ_FILE)
        pixels = max((len(r["perturbation"]) for r in records), default=0)
        genes = 2 + adversarial.shape[-1]
        np.savez_compressed(
            path,
            images=adversarial,
            indices=np.asarray([r["image"] for r in records], np.int64),
            true_labels=np.asarray([r["true_label"] for r in records], np.int32),
            adv_labels=np.asarray([r["adv_label"] for r in records], np.int32),
            target_labels=targets.astype(np.int32),
            perturbations=np.asarray([r["perturbation"] for r in records], np.float32).reshape(
                len(records), pixels, genes
            ),
            class_names=np.asarray(list(class_names or [])),
        )
        return {"format": fmt, "path": path, "images": len(records)}
    if not integral:
        raise InputError(
            "the adversarial images have fractional pixel values (de.round_rgb=False); "
            "PNG holds integers only: export them as npz"
        )
    from PIL import Image

    names = list(class_names or [])
    for image, record, target in zip(adversarial, records, targets, strict=True):
        label = record["true_label"]
        folder = os.path.join(out, split, names[label] if label < len(names) else f"class{label}")
        os.makedirs(folder, exist_ok=True)
        name = f"{record['image']:05d}_adv{record['adv_label']}"
        name += f"_target{target}.png" if target >= 0 else ".png"
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
            os.path.join(folder, name)
        )
    return {"format": fmt, "path": os.path.join(out, split), "images": len(records)}


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise InputError(f"workdir {workdir!r}: no config.json (expected a run's workdir)")
    try:
        with open(path) as f:
            return ml_collections.ConfigDict(json.load(f))
    except (json.JSONDecodeError, OSError) as err:
        raise InputError(f"workdir {workdir!r}: config.json is unreadable ({err})") from err


def from_run_start(spec: str, started_in: str) -> str:
    """A run's model or data spec with a relative path made relative to the directory the
    run started in (run_info.json's `cwd`), when the path is found there."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in PATH_KINDS or os.path.isabs(path) or not started_in:
        return spec
    candidate = os.path.join(started_in, path)
    return f"{kind}:{candidate}" if os.path.exists(candidate) else spec


def export_workdir(workdir: str, out: str, fmt: str = "png", batch_size: int = 256) -> dict:
    """Exports the successful attacks of a run's workdir (see the module docstring).

    The model and data are loaded from the run's config.json; relative paths in it are
    read from the directory the run started in.
    """
    from opa_jax import data as data_lib
    from opa_jax import workdir as workdir_lib
    from opa_jax.models import load_model

    if fmt not in FORMATS:
        raise InputError(f"format={fmt!r}: expected one of {FORMATS}")
    config = read_run_config(workdir)
    records = [r for r in workdir_lib.read_all_results(workdir) if r["success"]]
    started_in = workdir_lib.read_run_info(workdir).get("cwd", "")
    model_spec = from_run_start(config.model, started_in)
    model = load_model(model_spec, allow_pickle=config.allow_pickle, onnx=config.get("onnx"))
    model = model.with_precision(config.precision)
    dataset = data_lib.load_dataset(
        from_run_start(config.data, started_in),
        config.split,
        model.image_shape,
        config.resize,
        config.data_dir or None,
    )
    position_of = {int(index): p for p, index in enumerate(dataset.indices)}
    missing = sorted({r["image"] for r in records} - set(position_of))
    if missing:
        raise InputError(
            f"workdir {workdir!r}: images {missing[:10]} of its records are not in "
            f"{dataset.name}; expected the run's data"
        )
    chunks = []
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        source = dataset.read([position_of[r["image"]] for r in batch])
        adversarial = apply_perturbations(source, batch)
        check_labels(model, adversarial, batch, f"workdir {workdir!r}")
        chunks.append(adversarial)
    shape = (0, *model.image_shape)
    adversarial = np.concatenate(chunks) if chunks else np.zeros(shape, np.uint8)
    return write(out, fmt, adversarial, records, dataset.class_names, config.split)
