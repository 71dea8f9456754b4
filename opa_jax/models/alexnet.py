"""BVLC AlexNet (the Caffe reference model) and its weight import.

Su, Vargas & Sakurai (Sec. 4.4) attack BVLC AlexNet on ImageNet. The layers
and names follow Caffe's `bvlc_alexnet` deploy prototxt: conv1 -> LRN -> pool
-> conv2 (2 groups) -> LRN -> pool -> conv3 -> conv4 (2 groups) -> conv5 (2
groups) -> pool -> fc6 -> fc7 -> fc8.

Weights come in the widely used `bvlc_alexnet.npy` (Guerzhoy's Caffe->TF
conversion, used by Kratzert's finetune_alexnet_with_tensorflow): a pickled
dict `layer -> [weights, biases]` with conv weights [kh, kw, in/groups, out]
for BGR input and fc weights [in, out], where fc6 takes pool5 flattened in
HWC order. Unpickling can run arbitrary code, so a `.npy` loads only with
`allow_pickle=True`; `convert_alexnet_npy` writes a pickle-free `.npz` once.
"""

from __future__ import annotations

import math
import os
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import lax

from opa_jax.errors import InputError

IMAGENET_MEAN_BGR = (104.0, 117.0, 123.0)  # Caffe's ImageNet mean pixel, BGR

# layer -> (weights shape, biases shape) in the .npy / .npz layout.
ALEXNET_SHAPES = {
    "conv1": ((11, 11, 3, 96), (96,)),
    "conv2": ((5, 5, 48, 256), (256,)),
    "conv3": ((3, 3, 256, 384), (384,)),
    "conv4": ((3, 3, 192, 384), (384,)),
    "conv5": ((3, 3, 192, 256), (256,)),
    "fc6": ((9216, 4096), (4096,)),
    "fc7": ((4096, 4096), (4096,)),
    "fc8": ((4096, 1000), (1000,)),
}


def ceil_mode_padding(spatial, kernel: int, stride: int):
    """Right/bottom padding that makes an unpadded pool give Caffe's ceil-mode size.

    Caffe: out = ceil((size - kernel) / stride) + 1; the extra window is clipped
    at the border (max ignores it, average divides by the in-image count).
    """
    pads = []
    for size in spatial:
        out = math.ceil((size - kernel) / stride) + 1
        pads.append((0, max(0, (out - 1) * stride + kernel - size)))
    return tuple(pads)


def local_response_norm(x, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0):
    """Caffe's across-channel LRN: x / (k + alpha/size * sum_window x^2) ** beta.

    The window spans `size` channels centred on each channel, clipped at the ends.
    """
    squares = jnp.square(x.astype(jnp.float32))
    half = (size - 1) // 2
    window_sum = lax.reduce_window(
        squares,
        0.0,
        lax.add,
        (1, 1, 1, size),
        (1, 1, 1, 1),
        ((0, 0), (0, 0), (0, 0), (half, size - 1 - half)),
    )
    scale = (k + (alpha / size) * window_sum) ** beta
    return (x / scale).astype(x.dtype)


class AlexNet(nn.Module):
    """BVLC AlexNet. Input: RGB 0-255 [N, 227, 227, 3]; output: logits [N, num_classes]."""

    num_classes: int = 1000
    mean_bgr: tuple[float, float, float] = IMAGENET_MEAN_BGR
    dropout: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool = False):
        # Caffe models see BGR minus the mean pixel.
        x = images[..., ::-1] - jnp.asarray(self.mean_bgr)
        x = x.astype(self.dtype)

        def conv(x, features, kernel, stride, padding, groups, name):
            x = nn.Conv(
                features,
                (kernel, kernel),
                strides=stride,
                padding=padding,
                feature_group_count=groups,
                dtype=self.dtype,
                name=name,
            )(x)
            return nn.relu(x)

        def pool(x):
            return nn.max_pool(x, (3, 3), (2, 2), padding=ceil_mode_padding(x.shape[1:3], 3, 2))

        x = conv(x, 96, 11, 4, "VALID", 1, "conv1")  # [N, 55, 55, 96]
        x = pool(local_response_norm(x))  # [N, 27, 27, 96]
        x = conv(x, 256, 5, 1, 2, 2, "conv2")
        x = pool(local_response_norm(x))  # [N, 13, 13, 256]
        x = conv(x, 384, 3, 1, 1, 1, "conv3")
        x = conv(x, 384, 3, 1, 1, 2, "conv4")
        x = conv(x, 256, 3, 1, 1, 2, "conv5")
        x = pool(x)  # [N, 6, 6, 256]
        x = x.reshape(x.shape[0], -1)  # HWC flattening, as the converted fc6 weights expect
        x = nn.relu(nn.Dense(4096, dtype=self.dtype, name="fc6")(x))
        x = nn.Dropout(self.dropout, deterministic=not train, name="drop6")(x)
        x = nn.relu(nn.Dense(4096, dtype=self.dtype, name="fc7")(x))
        x = nn.Dropout(self.dropout, deterministic=not train, name="drop7")(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc8")(x)
        return x.astype(jnp.float32)


def _pickle_error(path: str) -> InputError:
    return InputError(
        f"AlexNet weights {path!r} are a pickled .npy. Unpickling a file can run arbitrary "
        "code, so it is refused by default. If you trust the file, convert it once to a "
        "pickle-free .npz: `python scripts/convert_alexnet.py --src "
        f"{path} --dst bvlc_alexnet.npz` and load `alexnet:bvlc_alexnet.npz`; or pass "
        "allow_pickle=True (load_model(..., allow_pickle=True))."
    )


def _read_layers(path: str, allow_pickle: bool) -> tuple[dict[str, tuple], np.ndarray | None]:
    """Reads {layer: (weights, biases)} and an optional BGR mean from .npz or pickled .npy."""
    if not os.path.isfile(path):
        raise InputError(f"AlexNet weights {path!r}: no such file")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY" and not magic.startswith(b"PK"):
        raise InputError(f"AlexNet weights {path!r}: not a .npy or .npz file")
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" not in str(e):
            raise InputError(f"AlexNet weights {path!r}: not a .npy/.npz file ({e})") from e
        if not allow_pickle:
            raise _pickle_error(path) from None
        loaded = None
    except (OSError, EOFError) as e:
        raise InputError(f"AlexNet weights {path!r}: not a readable .npy/.npz file ({e})") from e

    if loaded is None:  # a pickled dict, explicitly allowed
        try:
            # latin1: the original file was written by Python 2.
            obj = np.load(path, allow_pickle=True, encoding="latin1")
            table = obj.item() if isinstance(obj, np.ndarray) else obj
        except Exception as e:
            raise InputError(f"AlexNet weights {path!r}: cannot be unpickled ({e})") from e
        if not isinstance(table, dict):
            raise InputError(f"AlexNet weights {path!r}: expected a dict layer -> [W, b]")
        table = {(k.decode() if isinstance(k, bytes) else str(k)): v for k, v in table.items()}
        layers = {}
        for name in ALEXNET_SHAPES:
            if name not in table:
                raise InputError(f"AlexNet weights {path!r}: layer {name!r} is missing")
            entry = table[name]
            if len(entry) != 2:
                raise InputError(f"AlexNet weights {path!r}: {name} is not [weights, biases]")
            layers[name] = (np.asarray(entry[0]), np.asarray(entry[1]))
        mean = table.get("mean_bgr")
        return layers, None if mean is None else np.asarray(mean, np.float64)

    if isinstance(loaded, np.ndarray):
        raise InputError(
            f"AlexNet weights {path!r}: a plain array; expected a layer dict (.npy) or .npz"
        )
    with loaded:
        layers = {}
        for name in ALEXNET_SHAPES:
            keys = (f"{name}/weights", f"{name}/biases")
            missing = [k for k in keys if k not in loaded.files]
            if missing:
                raise InputError(f"AlexNet weights {path!r}: arrays {missing} are missing")
            layers[name] = (loaded[keys[0]], loaded[keys[1]])
        mean = loaded["mean_bgr"] if "mean_bgr" in loaded.files else None
    return layers, mean


def _check_shapes(path: str, layers: dict[str, tuple]) -> None:
    for name, (w_shape, b_shape) in ALEXNET_SHAPES.items():
        weights, biases = layers[name]
        if weights.shape != w_shape or biases.shape != b_shape:
            raise InputError(
                f"AlexNet weights {path!r}: {name} has shapes {weights.shape}, {biases.shape}; "
                f"BVLC AlexNet expects {w_shape}, {b_shape}"
            )


def convert_alexnet_npy(src: str, dst_npz: str) -> None:
    """Converts a pickled `bvlc_alexnet.npy` to a pickle-free `.npz` (this unpickles `src`)."""
    layers, mean = _read_layers(src, allow_pickle=True)
    _check_shapes(src, layers)
    arrays = {}
    for name, (weights, biases) in layers.items():
        arrays[f"{name}/weights"] = np.asarray(weights, np.float32)
        arrays[f"{name}/biases"] = np.asarray(biases, np.float32)
    arrays["mean_bgr"] = np.asarray(IMAGENET_MEAN_BGR if mean is None else mean, np.float64)
    os.makedirs(os.path.dirname(os.path.abspath(dst_npz)), exist_ok=True)
    tmp = dst_npz + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, dst_npz)


def load_alexnet(path: str, allow_pickle: bool = False):
    """Loads BVLC AlexNet weights (`.npz` from `convert_alexnet_npy`, or pickled `.npy`)."""
    from opa_jax.models import LoadedModel, zoo

    layers, mean = _read_layers(path, allow_pickle)
    _check_shapes(path, layers)
    params = {}
    for name, (weights, biases) in layers.items():
        params[name] = {
            "kernel": jnp.asarray(weights, jnp.float32),
            "bias": jnp.asarray(biases, jnp.float32),
        }
    mean_bgr = IMAGENET_MEAN_BGR if mean is None else tuple(float(m) for m in mean)
    module = AlexNet(mean_bgr=mean_bgr)
    return LoadedModel(
        name=f"alexnet:{path}",
        apply_fn=zoo.make_apply_fn(module),
        params={"params": params},
        image_shape=(227, 227, 3),
        num_classes=1000,
        class_names=None,
        meta={"architecture": "alexnet", "mean_bgr": list(mean_bgr), "weights": path},
    )
