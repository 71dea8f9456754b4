"""Datasets: folder layouts, index selection, resizing and clear errors."""

import importlib.util
import json

import numpy as np
import pytest
import realdata
import tensorflow_datasets as tfds
from PIL import Image

from opa_jax import data
from opa_jax.errors import InputError


def write_folder(root, names_by_class, size=(32, 32), split="test"):
    rng = np.random.default_rng(0)
    for class_name, names in names_by_class.items():
        class_dir = root / split / class_name
        class_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(class_dir / name)
    return root


def test_numbered_files_are_dataset_indices(tmp_path):
    write_folder(tmp_path, {"cat": ["00003.png", "00000.png"], "dog": ["00001.png"]})
    dataset = data.load_dataset(f"folder:{tmp_path}")
    np.testing.assert_array_equal(dataset.indices, [0, 1, 3])
    np.testing.assert_array_equal(dataset.labels, [0, 1, 0])
    assert dataset.class_names == ("cat", "dog")
    images = dataset.read([2, 0])
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    expected = np.asarray(Image.open(tmp_path / "test" / "cat" / "00003.png"))
    np.testing.assert_array_equal(images[0], expected)


def test_per_class_numbering_is_renumbered(tmp_path):
    write_folder(tmp_path, {"a": ["0000.jpg", "0001.jpg"], "b": ["0000.jpg"]}, split="train")
    dataset = data.load_dataset(f"folder:{tmp_path}", split="train")
    np.testing.assert_array_equal(dataset.indices, [0, 1, 2])
    np.testing.assert_array_equal(dataset.labels, [0, 0, 1])


def test_selection_by_range_and_list(tmp_path):
    write_folder(tmp_path, {"a": [f"{i:05d}.png" for i in range(0, 10, 2)]})
    dataset = data.load_dataset(f"folder:{tmp_path}")
    np.testing.assert_array_equal(dataset.indices[data.select(dataset, "2:7")], [2, 4, 6])
    np.testing.assert_array_equal(dataset.indices[data.select(dataset, "8,0")], [8, 0])
    assert len(data.select(dataset, "")) == 5
    with pytest.raises(InputError, match="not in"):
        data.select(dataset, "3")
    with pytest.raises(InputError, match="selection"):
        data.select(dataset, "x-y")


def test_alternatives_read_the_first_that_exists(tmp_path):
    write_folder(tmp_path / "second", {"a": ["00004.png"], "b": ["00002.png"]})
    spec = f"folder:{tmp_path / 'first'}|folder:{tmp_path / 'second'}"
    dataset = data.load_dataset(spec)
    assert dataset.name == f"folder:{tmp_path / 'second'}"
    np.testing.assert_array_equal(dataset.indices, [2, 4])


def test_alternatives_none_available_names_every_reason(tmp_path):
    spec = f"folder:{tmp_path / 'missing'}|tfds:no_such_dataset_here"
    with pytest.raises(InputError) as error:
        data.load_dataset(spec)
    message = str(error.value)
    assert "none of its alternatives" in message
    assert f"(1) folder:{tmp_path / 'missing'}" in message and "does not exist" in message
    assert "(2) tfds:no_such_dataset_here" in message and "unknown tfds dataset" in message


def test_alternatives_do_not_hide_a_broken_folder(tmp_path):
    (tmp_path / "empty" / "test" / "cat").mkdir(parents=True)
    write_folder(tmp_path / "good", {"a": ["00000.png"]})
    with pytest.raises(InputError, match="no images"):
        data.load_dataset(f"folder:{tmp_path / 'empty'}|folder:{tmp_path / 'good'}")


def test_clear_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        data.load_dataset(f"folder:{tmp_path / 'missing'}")
    with pytest.raises(InputError, match="unknown kind"):
        data.load_dataset("hub:cifar10")
    with pytest.raises(InputError, match="expected folder:PATH"):
        data.load_dataset("cifar10")
    (tmp_path / "empty" / "test" / "cat").mkdir(parents=True)
    with pytest.raises(InputError, match="no images"):
        data.load_dataset(f"folder:{tmp_path / 'empty'}")
    with pytest.raises(InputError, match="split folder 'train'"):
        data.load_dataset(f"folder:{tmp_path / 'empty'}", split="train")
    write_folder(tmp_path / "big", {"a": ["00000.png"]}, size=(40, 40))
    dataset = data.load_dataset(f"folder:{tmp_path / 'big'}", image_shape=(32, 32, 3))
    with pytest.raises(InputError, match="40x40.*32x32"):
        dataset.read([0])
    (tmp_path / "bad" / "test" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "test" / "a" / "00000.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot be decoded"):
        data.load_dataset(f"folder:{tmp_path / 'bad'}").read([0])


def gradient_image(height, width):
    """Red 50; green rises from 0 to 255 down the rows, blue from 0 to 255 across the columns."""
    rows = np.repeat(np.arange(height)[:, None] * 255 / (height - 1), width, axis=1)
    cols = np.repeat(np.arange(width)[None, :] * 255 / (width - 1), height, axis=0)
    return np.stack([np.full((height, width), 50.0), rows, cols], -1).round().astype(np.uint8)


@pytest.mark.parametrize("height, width", [(300, 400), (400, 300)])
def test_imagenet_flat_folder_resize_and_centre_crop(tmp_path, height, width):
    """The ImageNet eval transform on a picture whose colours give each pixel's source
    position: the shorter side goes to round(227 * 256 / 224) = 259, the longer one in
    proportion (345), then the central 227 x 227 is cut out (offsets 16 and 59). A
    bilinear resize keeps a linear gradient linear, so each output pixel must show the
    colour of the source position it maps to, to within the uint8 rounding."""
    index = {"0": ["n01440764", "tench"], "1": ["n01443537", "goldfish"]}
    (tmp_path / "imagenet_class_index.json").write_text(json.dumps(index))
    Image.fromarray(gradient_image(height, width)).save(tmp_path / "n01443537_goldfish.png")
    dataset = data.load_dataset(f"folder:{tmp_path}", image_shape=(227, 227, 3),
                                resize="center_crop")  # fmt: skip
    np.testing.assert_array_equal(dataset.labels, [1])
    assert dataset.class_names == ("tench", "goldfish")
    image = dataset.read([0])[0].astype(np.float64)
    assert image.shape == (227, 227, 3)
    resized = (259, 345) if height < width else (345, 259)
    top, left = (resized[0] - 227) // 2, (resized[1] - 227) // 2
    out = np.arange(227) + 0.5  # output pixel centres
    source_row = (out + top) * height / resized[0] - 0.5
    source_col = (out + left) * width / resized[1] - 0.5
    np.testing.assert_array_equal(image[..., 0], 50)
    green = np.broadcast_to((source_row * 255 / (height - 1))[:, None], (227, 227))
    blue = np.broadcast_to((source_col * 255 / (width - 1))[None, :], (227, 227))
    # One pixel of offset or scale would move these by about 1 (255 / 299 * 300 / 259).
    assert np.abs(image[..., 1] - green).max() <= 1.0
    assert np.abs(image[..., 2] - blue).max() <= 1.0


@pytest.mark.realdata
def test_exact_cifar10_test_images():
    realdata.require(realdata.CIFAR10_EXACT)
    dataset = data.load_dataset(f"folder:{realdata.CIFAR10_EXACT}")
    assert len(dataset) == 1017
    np.testing.assert_array_equal(dataset.indices, np.arange(1017))
    np.testing.assert_array_equal(dataset.labels[:5], [3, 8, 8, 0, 6])  # the official order


class TfdsTinyImages(tfds.core.GeneratorBasedBuilder):
    """A real tfds builder: 6 distinct 32x32 images, label = image value mod 3, prepared
    as ArrayRecord on disk with PIL (no TensorFlow, no network)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(32, 32, 3)),
                "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
            }
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples()}

    def _generate_examples(self):
        for value in range(6):
            image = Image.fromarray(np.full((32, 32, 3), 40 * value, np.uint8))
            yield value, {"image": image, "label": value % 3}


def test_tfds_path_reads_a_prepared_dataset_without_tensorflow(tmp_path):
    TfdsTinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    dataset = data.load_dataset(
        "tfds:tfds_tiny_images", "test", (32, 32, 3), data_dir=str(tmp_path)
    )
    assert len(dataset) == 6 and dataset.class_names == ("a", "b", "c")
    images = dataset.read(range(6))
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
    values = images[:, 0, 0, 0].astype(int)
    assert sorted(values) == [0, 40, 80, 120, 160, 200]  # every image once, decoded exactly
    np.testing.assert_array_equal(dataset.labels, (values // 40) % 3)  # labels read undecoded
    assert np.all(images == images[:, :1, :1, :1])
    small = data.load_dataset("tfds:tfds_tiny_images", "test", (16, 16, 3), data_dir=str(tmp_path))
    with pytest.raises(InputError, match="model expects"):
        small.read([0])


def test_tfds_errors_say_what_is_missing(tmp_path):
    with pytest.raises(InputError, match="unknown tfds dataset"):
        data.load_dataset("tfds:no_such_dataset_xyz", "test", data_dir=str(tmp_path))
    if importlib.util.find_spec("tensorflow") is None:
        # Not prepared, and preparing needs TensorFlow: said at once, with no download tried.
        with pytest.raises(InputError, match="not prepared under data_dir .* needs TensorFlow"):
            data.load_dataset("tfds:cifar10", "test", data_dir=str(tmp_path))
    TfdsTinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    with pytest.raises(InputError, match="split 'validation' is not available"):
        data.load_dataset("tfds:tfds_tiny_images", "validation", data_dir=str(tmp_path))
