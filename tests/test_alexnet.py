"""BVLC AlexNet: the Flax port against an independent NumPy Caffe forward pass.

The synthetic weights are drawn in Caffe's own layout (conv [out, in/groups, kh,
kw], fc [out, in], fc6 reading pool5 flattened as C, H, W) and converted to the
`bvlc_alexnet.npy` layout the way Guerzhoy's conversion did. The reference
below works in Caffe's layout, so it checks the port's layout handling too.
"""

import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from opa_jax.errors import InputError
from opa_jax.models import load_model
from opa_jax.models.alexnet_weights import ALEXNET_SHAPES, load_alexnet
from opa_jax.models.layers import ceil_mode_padding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN_BGR = np.array([104.0, 117.0, 123.0])

# Caffe layer shapes: conv (out, in/groups, kh, kw), stride, pad, groups; fc (out, in).
CAFFE_CONVS = {
    "conv1": ((96, 3, 11, 11), 4, 0, 1),
    "conv2": ((256, 48, 5, 5), 1, 2, 2),
    "conv3": ((384, 256, 3, 3), 1, 1, 1),
    "conv4": ((384, 192, 3, 3), 1, 1, 2),
    "conv5": ((256, 192, 3, 3), 1, 1, 2),
}
CAFFE_FCS = {"fc6": (4096, 9216), "fc7": (4096, 4096), "fc8": (1000, 4096)}


# ---------------------------------------------------------------- NumPy Caffe reference


def caffe_conv(x, weights, biases, stride, pad, groups):
    """x [C, H, W] -> [O, Ho, Wo], Caffe convolution with groups."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    out_c, in_per_group, kh, kw = weights.shape
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
    windows = windows[:, ::stride, ::stride]  # [C, Ho, Wo, kh, kw]
    per_group = out_c // groups
    outputs = []
    for g in range(groups):
        patch = windows[g * in_per_group : (g + 1) * in_per_group]
        kernel = weights[g * per_group : (g + 1) * per_group]
        outputs.append(np.einsum("chwij,ocij->ohw", patch, kernel, optimize=True))
    return np.concatenate(outputs) + biases[:, None, None]


def caffe_lrn(x, local_size=5, alpha=1e-4, beta=0.75, k=1.0):
    """Caffe ACROSS_CHANNELS LRN; alpha is divided by local_size."""
    channels = x.shape[0]
    half = local_size // 2
    squares = x**2
    out = np.empty_like(x)
    for c in range(channels):
        window = squares[max(0, c - half) : min(channels, c + half + 1)].sum(axis=0)
        out[c] = x[c] / (k + alpha / local_size * window) ** beta
    return out


def caffe_max_pool(x, kernel=3, stride=2):
    """Caffe max pooling, ceil-mode output size, windows clipped at the border."""
    channels, height, width = x.shape
    out_h = math.ceil((height - kernel) / stride) + 1
    out_w = math.ceil((width - kernel) / stride) + 1
    out = np.empty((channels, out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            rows = slice(i * stride, min(i * stride + kernel, height))
            cols = slice(j * stride, min(j * stride + kernel, width))
            out[:, i, j] = x[:, rows, cols].max(axis=(1, 2))
    return out


def caffe_alexnet_forward(caffe, image_rgb):
    """The bvlc_alexnet deploy net on one RGB 0-255 image [227, 227, 3], in float64."""
    x = (image_rgb[..., ::-1] - MEAN_BGR).transpose(2, 0, 1).astype(np.float64)  # BGR, [C,H,W]
    relu = lambda v: np.maximum(v, 0)
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5"):
        _, stride, pad, groups = CAFFE_CONVS[name]
        weights, biases = caffe[name]
        x = relu(caffe_conv(x, weights.astype(np.float64), biases, stride, pad, groups))
        if name in ("conv1", "conv2"):
            x = caffe_max_pool(caffe_lrn(x))
        elif name == "conv5":
            x = caffe_max_pool(x)
    x = x.reshape(-1)  # Caffe flattens pool5 as C, H, W
    for name in ("fc6", "fc7", "fc8"):
        weights, biases = caffe[name]
        x = weights.astype(np.float64) @ x + biases
        if name != "fc8":
            x = relu(x)
    return x


# ---------------------------------------------------------------- synthetic weights


def to_npy_layout(caffe):
    """Caffe layout -> the `bvlc_alexnet.npy` layout (Caffe->TF conversion)."""
    table = {}
    for name, (weights, biases) in caffe.items():
        if name in CAFFE_CONVS:
            weights = weights.transpose(2, 3, 1, 0)  # [kh, kw, in/groups, out]
        elif name == "fc6":  # inputs reordered from C,H,W to H,W,C flattening
            weights = weights.reshape(4096, 256, 6, 6).transpose(2, 3, 1, 0).reshape(9216, 4096)
        else:
            weights = weights.T  # [in, out]
        table[name] = [np.ascontiguousarray(weights), biases]
    return table


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    rng = np.random.default_rng(0)
    caffe = {}
    shapes = {name: spec[0] for name, spec in CAFFE_CONVS.items()} | CAFFE_FCS
    for name, shape in shapes.items():
        fan_in = int(np.prod(shape[1:]))
        weights = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        biases = rng.uniform(-0.1, 0.1, shape[0]).astype(np.float32)
        caffe[name] = (weights, biases)
    path = str(tmp_path_factory.mktemp("alexnet") / "bvlc_alexnet.npy")
    np.save(path, to_npy_layout(caffe), allow_pickle=True)  # a pickled dict, like the original
    images = rng.uniform(0, 255, (2, 227, 227, 3)).astype(np.float32)
    return caffe, path, images


def test_npy_layout_matches_the_published_shapes(synthetic):
    _, path, _ = synthetic
    table = np.load(path, allow_pickle=True, encoding="latin1").item()
    for name, (w_shape, b_shape) in ALEXNET_SHAPES.items():
        assert table[name][0].shape == w_shape and table[name][1].shape == b_shape


@pytest.mark.parametrize("height, width", [(8, 8), (7, 10), (14, 9), (13, 13), (27, 27), (55, 55)])
def test_ceil_mode_pooling_matches_caffe(height, width):
    """The port's 3x3 stride-2 pool (ceil_mode_padding + max_pool) against the NumPy Caffe
    pool, on negative inputs, so that a zero-padded extra window would show. At 8 or 14,
    ceil mode gives one more row or column than floor mode; at AlexNet's own sizes (55,
    27, 13 from a 227 input) it adds no padding."""
    x = np.random.default_rng(height * 100 + width).normal(-5.0, 1.0, (1, height, width, 4))
    padding = ceil_mode_padding((height, width), 3, 2)
    pooled = np.asarray(nn.max_pool(jnp.asarray(x), (3, 3), (2, 2), padding=padding))[0]
    reference = caffe_max_pool(x[0].transpose(2, 0, 1)).transpose(1, 2, 0)
    assert pooled.shape == reference.shape
    np.testing.assert_allclose(pooled, reference, rtol=1e-6)
    if height in (55, 27, 13):
        assert padding == ((0, 0), (0, 0))


def test_flax_port_matches_numpy_caffe_forward(synthetic):
    caffe, path, images = synthetic
    model = load_alexnet(path, allow_pickle=True)
    assert model.image_shape == (227, 227, 3) and model.num_classes == 1000
    logits = np.asarray(model.apply_fn(model.params, images), np.float64)
    reference = np.stack([caffe_alexnet_forward(caffe, image) for image in images])
    assert logits.shape == reference.shape == (2, 1000)
    relative = np.abs(logits - reference).max() / np.abs(reference).max()
    assert relative < 1e-4, relative
    np.testing.assert_array_equal(logits.argmax(-1), reference.argmax(-1))
    # The two images give different outputs (the check is not on a constant).
    assert np.abs(reference[0] - reference[1]).max() > 100 * np.abs(logits - reference).max()


def test_pickled_npy_needs_explicit_opt_in(synthetic):
    _, path, _ = synthetic
    for call in (lambda: load_alexnet(path), lambda: load_model(f"alexnet:{path}")):
        with pytest.raises(InputError) as error:
            call()
        message = str(error.value)
        assert "allow_pickle" in message and "arbitrary code" in message
        assert "convert_alexnet.py" in message


def test_npz_conversion_round_trip_loads_without_opt_in(synthetic, tmp_path):
    _, path, images = synthetic
    npz = str(tmp_path / "bvlc_alexnet.npz")
    subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "convert_alexnet.py"), "--src", path,
         "--dst", npz],
        check=True, capture_output=True, cwd=REPO,
    )  # fmt: skip
    with np.load(npz, allow_pickle=False) as arrays:  # pickle-free: every array loads
        assert all(arrays[key].dtype != object for key in arrays.files)
        np.testing.assert_allclose(arrays["mean_bgr"], MEAN_BGR)
    converted = load_model(f"alexnet:{npz}")
    original = load_alexnet(path, allow_pickle=True)
    for name in ALEXNET_SHAPES:
        for part in ("kernel", "bias"):
            np.testing.assert_array_equal(
                converted.params["params"][name][part], original.params["params"][name][part]
            )
    np.testing.assert_array_equal(
        converted.apply_fn(converted.params, images[:1]),
        original.apply_fn(original.params, images[:1]),
    )


def test_mean_pixel_from_the_weights_file(tmp_path):
    arrays = {}
    for name, (w_shape, b_shape) in ALEXNET_SHAPES.items():
        arrays[f"{name}/weights"] = np.zeros(w_shape, np.float32)
        arrays[f"{name}/biases"] = np.zeros(b_shape, np.float32)
    arrays["mean_bgr"] = np.array([100.0, 110.0, 120.0])
    np.savez(tmp_path / "w.npz", **arrays)
    model = load_alexnet(str(tmp_path / "w.npz"))
    assert model.meta["mean_bgr"] == [100.0, 110.0, 120.0]


@pytest.mark.parametrize("broken", ["missing", "wrong_shape", "not_numpy"])
def test_bad_weights_files_are_input_errors(tmp_path, broken):
    path = tmp_path / "w.npz"
    if broken == "missing":
        np.savez(path, **{"conv1/weights": np.zeros((11, 11, 3, 96), np.float32)})
        expected = "missing"
    elif broken == "wrong_shape":
        arrays = {}
        for name, (w_shape, b_shape) in ALEXNET_SHAPES.items():
            arrays[f"{name}/weights"] = np.zeros(w_shape, np.float32)
            arrays[f"{name}/biases"] = np.zeros(b_shape, np.float32)
        arrays["fc8/weights"] = np.zeros((4096, 10), np.float32)
        np.savez(path, **arrays)
        expected = "fc8"
    else:
        path.write_bytes(b"not a numpy file")
        expected = "not a"
    with pytest.raises(InputError, match=expected):
        load_alexnet(str(path))
