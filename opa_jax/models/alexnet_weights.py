"""BVLC AlexNet weights: reading, checking and the pickle-free conversion.

Weights come in the widely used `bvlc_alexnet.npy` (Guerzhoy's Caffe->TF
conversion, used by Kratzert's finetune_alexnet_with_tensorflow): a pickled
dict `layer -> [weights, biases]` with conv weights [kh, kw, in/groups, out]
for BGR input and fc weights [in, out], where fc6 takes pool5 flattened in
HWC order. Unpickling can run arbitrary code, so a `.npy` loads only with
`allow_pickle=True`; `convert_alexnet_npy` writes a pickle-free `.npz` once.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from opa_jax import files
from opa_jax.errors import InputError
from opa_jax.models.alexnet import IMAGENET_MEAN_BGR, AlexNet
from opa_jax.models.base import LoadedModel, make_apply_fn

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
    files.write_atomic(dst_npz, lambda f: np.savez(f, **arrays))


def load_alexnet(path: str, allow_pickle: bool = False) -> LoadedModel:
    """Loads BVLC AlexNet weights (`.npz` from `convert_alexnet_npy`, or pickled `.npy`)."""
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
        apply_fn=make_apply_fn(module),
        params={"params": params},
        image_shape=(227, 227, 3),
        num_classes=1000,
        class_names=None,
        meta={"architecture": "alexnet", "mean_bgr": list(mean_bgr), "weights": path},
        module=module,
    )
