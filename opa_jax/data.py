"""Datasets as lazily read, index-addressed image collections.

A dataset is chosen by a spec string:

- `folder:PATH`: `PATH/<split>/<class_name>/<index>.<ext>` (the layout of
  `cifar10-test-exact` and the extracted `cifar10-jpeg.tar.gz`). Class indices
  follow sorted class-folder names. When every file stem is a distinct number
  it is the dataset index; otherwise (e.g. `0000.jpg` in every class) files
  are numbered in (class, name) order. A flat folder holding
  `imagenet_class_index.json` and files named `<wnid>_*.JPEG` is read as
  ImageNet (labels from the wnid).
- `tfds:NAME` (e.g. `tfds:cifar10`, `tfds:imagenet2012`): read through
  `builder.as_data_source` (ArrayRecord), which needs no TensorFlow. Preparing
  a dataset that is not yet under `data_dir` (download, then encode) does need
  TensorFlow; `imagenet2012` also needs its manual-download files in
  `data_dir/downloads/manual`.

Alternatives are joined with `|`: `folder:../shared/data/cifar10-test-exact|tfds:cifar10`
reads the folder where it exists and otherwise tfds. A folder that does not exist
is passed over; any other failure (a corrupt folder, tfds without a network) stops
with the reasons of every alternative.

Images are decoded only when a batch is asked for, so memory stays flat in
the number of images. They come as uint8 `[n, H, W, C]` with the model's
channel count C: grayscale files (MNIST-like) as `[n, H, W, 1]` for a
one-channel model, colour files as RGB for a three-channel one (a grayscale
file among colour ones, as ImageNet has, is converted). A dataset whose
channels do not match the model's is refused, naming both.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Sequence

import numpy as np

from opa_jax.errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm")
# The PIL mode an image file is decoded into, by the model's channel count.
MODES = {1: "L", 3: "RGB", 4: "RGBA"}
GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")


def channel_name(channels: int) -> str:
    return {1: "1 channel (grayscale)", 3: "3 channels (RGB)"}.get(channels, f"{channels} channels")


def _mode(image_shape, what: str) -> str:
    """The PIL mode that files are decoded into for a model input of `image_shape`."""
    channels = 3 if image_shape is None else int(image_shape[-1])
    if channels not in MODES:
        raise InputError(
            f"{what}: image files hold 1, 3 or 4 channels, but the model expects "
            f"{channel_name(channels)}; give such images as arrays (the Python API, or tfds)"
        )
    return MODES[channels]


def check_channels(name: str, data_channels: int, image_shape) -> None:
    """Refuses data whose channel count is not the model's, naming both."""
    if image_shape is not None and data_channels != image_shape[-1]:
        raise InputError(
            f"dataset {name} has images of {channel_name(data_channels)}, but the model "
            f"expects {channel_name(int(image_shape[-1]))} (input {list(image_shape)})"
        )


@dataclasses.dataclass
class Dataset:
    """Index-addressed images; `read(positions)` decodes only what is asked for."""

    name: str
    labels: np.ndarray  # [N] int32
    indices: np.ndarray  # [N] int64, the dataset index of each position
    class_names: tuple[str, ...]
    read_fn: Callable[[Sequence[int]], np.ndarray]  # positions -> uint8 [n, H, W, C]

    def __len__(self) -> int:
        return len(self.labels)

    @functools.cached_property
    def position_of(self) -> dict[int, int]:
        """Dataset index -> position."""
        return {int(i): p for p, i in enumerate(self.indices)}

    def read(self, positions: Sequence[int]) -> np.ndarray:
        return self.read_fn(list(positions))


def _decode(path: str, image_shape: tuple[int, int, int] | None, resize: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    mode = _mode(image_shape, f"image {path}")
    try:
        with Image.open(path) as im:
            if mode == "L" and im.mode not in GRAYSCALE_MODES:
                raise InputError(
                    f"image {path} is in colour ({im.mode}), but the model expects "
                    f"{channel_name(1)}"
                )
            im = im.convert(mode)
            if image_shape is not None and (im.height, im.width) != tuple(image_shape[:2]):
                if resize == "none":
                    raise InputError(
                        f"image {path} is {im.height}x{im.width}, but the model expects "
                        f"{image_shape[0]}x{image_shape[1]}; set --config.resize=center_crop "
                        "to resize and centre-crop"
                    )
                im = resize_center_crop(im, image_shape[:2])
            pixels = np.asarray(im, dtype=np.uint8)
            return pixels[..., None] if pixels.ndim == 2 else pixels  # [H, W, C]
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"image {path}: cannot be decoded ({e})") from e


def _file_channels(path: str) -> int:
    """1 for a grayscale image file, 4 for RGBA, else 3 (read from its header only)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return 1 if im.mode in GRAYSCALE_MODES else 4 if im.mode == "RGBA" else 3
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"image {path}: cannot be decoded ({e})") from e


def resize_center_crop(im, size: tuple[int, int]):
    """The standard ImageNet eval transform: shorter side to 256/224 of the crop, centre crop."""
    from PIL import Image

    crop_h, crop_w = size
    scale = round(max(crop_h, crop_w) * 256 / 224) / min(im.height, im.width)
    new_h, new_w = max(crop_h, round(im.height * scale)), max(crop_w, round(im.width * scale))
    im = im.resize((new_w, new_h), Image.BILINEAR)
    top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
    return im.crop((left, top, left + crop_w, top + crop_h))


def resize_array(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`resize_center_crop` of a uint8 [H, W, C] array (C = 1 as a grayscale image)."""
    from PIL import Image

    gray = image.shape[-1] == 1
    resized = np.asarray(
        resize_center_crop(Image.fromarray(image[..., 0] if gray else image), size)
    )
    return resized[..., None] if gray else resized


def _files_reader(paths, image_shape, resize):
    def read(positions):
        if not positions:
            shape = tuple(image_shape) if image_shape else (0, 0, 3)
            return np.zeros((0, *shape), np.uint8)
        images = [_decode(paths[p], image_shape, resize) for p in positions]
        shapes = {im.shape for im in images}
        if len(shapes) > 1:
            raise InputError(f"images of different sizes {sorted(shapes)} in one dataset")
        return np.stack(images)

    return read


def _load_imagenet_flat(root, image_shape, resize) -> Dataset:
    with open(os.path.join(root, "imagenet_class_index.json")) as f:
        index = json.load(f)
    wnid_to_label = {wnid: int(k) for k, (wnid, _) in index.items()}
    class_names = tuple(index[str(i)][1] for i in range(len(index)))
    files = sorted(f for f in os.listdir(root) if f.lower().endswith(IMAGE_EXTENSIONS))
    paths, labels = [], []
    for f in files:
        wnid = f.split("_")[0]
        if wnid not in wnid_to_label:
            raise InputError(f"image {os.path.join(root, f)}: unknown ImageNet wnid {wnid!r}")
        paths.append(os.path.join(root, f))
        labels.append(wnid_to_label[wnid])
    if not paths:
        raise InputError(f"dataset folder {root}: no images found")
    return Dataset(
        name=f"folder:{root}",
        labels=np.asarray(labels, np.int32),
        indices=np.arange(len(paths), dtype=np.int64),
        class_names=class_names,
        read_fn=_files_reader(paths, image_shape, resize),
    )


def load_folder(root: str, split: str, image_shape=None, resize: str = "none") -> Dataset:
    if not os.path.isdir(root):
        raise InputError(f"dataset folder {root!r} does not exist or is not a directory")
    if os.path.exists(os.path.join(root, "imagenet_class_index.json")):
        return _load_imagenet_flat(root, image_shape, resize)
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        raise InputError(
            f"dataset folder {root!r}: expected a split folder {split!r} "
            f"(layout <root>/<split>/<class_name>/<index>.<ext>); found {found}"
        )
    class_names = tuple(
        sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    )
    entries = []  # (index or None, stem, path, label)
    for label, name in enumerate(class_names):
        class_dir = os.path.join(split_dir, name)
        for f in os.listdir(class_dir):
            stem, ext = os.path.splitext(f)
            if ext.lower() in IMAGE_EXTENSIONS:
                index = int(stem) if stem.isdigit() else None
                entries.append((index, stem, os.path.join(class_dir, f), label))
    if not entries:
        raise InputError(
            f"dataset folder {split_dir!r}: no images found (expected "
            f"<class_name>/<index>.<ext> with ext in {IMAGE_EXTENSIONS})"
        )
    numbered = [e[0] for e in entries]
    if None not in numbered and len(set(numbered)) == len(numbered):
        entries.sort(key=lambda e: e[0])
        indices = [e[0] for e in entries]
    else:  # names are not dataset-wide indices (e.g. 0000.jpg in every class): number them
        entries.sort(key=lambda e: (e[3], e[1]))
        indices = list(range(len(entries)))
    paths = [e[2] for e in entries]
    if image_shape is not None:  # the first file says what the folder holds
        found = _file_channels(paths[0])
        if not (found == 4 and image_shape[-1] == 3):  # RGBA reads as RGB
            check_channels(f"folder:{root}", found, image_shape)
    return Dataset(
        name=f"folder:{root}",
        labels=np.asarray([e[3] for e in entries], np.int32),
        indices=np.asarray(indices, np.int64),
        class_names=class_names,
        read_fn=_files_reader(paths, image_shape, resize),
    )


def _tfds_prepare(tfds, builder, name: str) -> None:
    """Downloads and prepares a tfds dataset as ArrayRecord (random access), or says why not."""
    where = os.fspath(builder.data_dir_root)
    try:
        import tensorflow  # noqa: F401  (tfds encodes images with it while preparing)
    except ImportError as e:
        raise InputError(
            f"dataset tfds:{name} is not prepared under data_dir {where!r}, and preparing it "
            "needs TensorFlow (`pip install tensorflow`) and a network for the download. Either "
            f"install TensorFlow here, or run `tfds build {name} --file_format=array_record "
            f"--data_dir=DIR` on a machine that has both and copy DIR/{name} into {where!r} "
            "(reading a prepared dataset needs no TensorFlow)"
        ) from e
    manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    hint = (
        f" It needs its manual-download files in {os.path.join(where, 'downloads', 'manual')}."
        if manual
        else " Is there a network? A machine without one needs a prepared copy in data_dir."
    )
    try:
        builder.download_and_prepare(file_format="array_record")
    except Exception as e:
        raise InputError(
            f"dataset tfds:{name}: download and preparation under {where!r} failed ({e}).{hint}"
        ) from e


def load_tfds(name: str, split: str, image_shape=None, resize="none", data_dir=None) -> Dataset:
    """A tfds dataset through `as_data_source` (ArrayRecord, random access, no TensorFlow).

    Labels are read without decoding any image; images are decoded (with PIL) only
    when a batch is asked for. A dataset not yet prepared is prepared first, which
    tfds does only with TensorFlow installed and a network (or manual files).
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise InputError(
            f"dataset tfds:{name}: the module {e.name!r} is missing; install the project's "
            "dependencies (pip install -e .), or tensorflow-datasets and importlib_resources"
        ) from e
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except ModuleNotFoundError as e:
        raise InputError(f"dataset tfds:{name}: tfds needs the missing module {e.name!r}") from e
    except Exception as e:
        raise InputError(f"dataset tfds:{name}: unknown tfds dataset ({e})") from e
    if not builder.is_prepared():
        _tfds_prepare(tfds, builder, name)
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise InputError(
            f"dataset tfds:{name} under {os.fspath(builder.data_dir)!r} is prepared as "
            f"{builder.info.file_format.value}, which has no random access; prepare it again "
            f"with `tfds build {name} --file_format=array_record`"
        )
    try:
        source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    except Exception as e:
        raise InputError(f"dataset tfds:{name} split {split!r} is not available: {e}") from e
    image_feature = builder.info.features["image"]
    if image_feature.shape[-1] is not None:
        check_channels(f"tfds:{name}", int(image_feature.shape[-1]), image_shape)
    class_names = tuple(builder.info.features["label"].names)
    labels = np.asarray([int(source[i]["label"]) for i in range(len(source))], np.int32)

    def decode(encoded) -> np.ndarray:
        # Mocked sources (tfds.testing) hand out arrays; prepared ones hand out bytes.
        if isinstance(encoded, bytes | np.bytes_):
            return np.asarray(image_feature.decode_example_np(bytes(encoded)), np.uint8)
        return np.asarray(encoded, np.uint8)

    def read(positions):
        images = []
        for p in positions:
            image = decode(source[p]["image"])
            if image_shape is not None and image.shape[:2] != tuple(image_shape[:2]):
                if resize == "none":
                    raise InputError(
                        f"tfds:{name} image {p} is {image.shape[:2]}, model expects "
                        f"{tuple(image_shape[:2])}; set --config.resize=center_crop"
                    )
                image = resize_array(image, image_shape[:2])
            images.append(image)
        return np.stack(images) if images else np.zeros((0, *image_shape), np.uint8)

    return Dataset(
        name=f"tfds:{name}",
        labels=labels,
        indices=np.arange(len(labels), dtype=np.int64),
        class_names=class_names,
        read_fn=read,
    )


def load_dataset(
    spec: str, split: str = "test", image_shape=None, resize: str = "none", data_dir=None
) -> Dataset:
    """Loads a dataset from a spec string (see the module docstring)."""
    alternatives = [part.strip() for part in spec.split("|")]
    if len(alternatives) > 1:
        return _load_first_available(spec, alternatives, split, image_shape, resize, data_dir)
    kind, sep, arg = spec.partition(":")
    if resize not in ("none", "center_crop"):
        raise InputError(f"resize={resize!r}: expected 'none' or 'center_crop'")
    if not sep or not arg:
        raise InputError(
            f"dataset spec {spec!r}: expected folder:PATH or tfds:NAME "
            "(e.g. 'folder:../shared/data/cifar10-test-exact' or 'tfds:cifar10')"
        )
    if kind == "folder":
        return load_folder(arg, split, image_shape, resize)
    if kind == "tfds":
        return load_tfds(arg, split, image_shape, resize, data_dir)
    raise InputError(f"dataset spec {spec!r}: unknown kind {kind!r}; expected folder or tfds")


def _load_first_available(spec, alternatives, split, image_shape, resize, data_dir) -> Dataset:
    """The first alternative of `spec` that can be read; a missing folder is passed over."""
    reasons = []
    for alternative in alternatives:
        kind, _, arg = alternative.partition(":")
        if kind == "folder" and arg and not os.path.exists(arg):
            reasons.append(f"{alternative}: {arg!r} does not exist")
            continue
        try:
            return load_dataset(alternative, split, image_shape, resize, data_dir)
        except InputError as e:
            if kind != "tfds":
                raise
            reasons.append(f"{alternative}: {e}")
    raise InputError(
        f"dataset spec {spec!r}: none of its alternatives can be read here. "
        + " ".join(f"({i + 1}) {reason}" for i, reason in enumerate(reasons))
    )


def select(dataset: Dataset, selection: str) -> np.ndarray:
    """Positions chosen by a selection string: '' (all), 'A:B' (index range), or 'i,j,k'."""
    selection = selection.strip()
    if not selection:
        return np.arange(len(dataset))
    try:
        if ":" in selection:
            lo, hi = selection.split(":")
            lo = int(lo) if lo else 0
            hi = int(hi) if hi else np.iinfo(np.int64).max
            return np.nonzero((dataset.indices >= lo) & (dataset.indices < hi))[0]
        wanted = [int(s) for s in selection.split(",") if s.strip()]
    except ValueError as e:
        raise InputError(
            f"selection {selection!r}: expected 'A:B' (index range) or a comma list of indices"
        ) from e
    missing = [i for i in wanted if i not in dataset.position_of]
    if missing:
        raise InputError(f"selection: image indices {missing[:10]} are not in {dataset.name}")
    return np.asarray([dataset.position_of[i] for i in wanted], np.int64)
