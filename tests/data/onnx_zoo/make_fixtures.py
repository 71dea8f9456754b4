"""Writes the ONNX parity fixtures: NiN, All-CNN-C and VGG16 of the zoo, exported by PyTorch.

For each architecture (at a small width), this script
1. draws seed-0 zoo weights with random batch-norm statistics and saves them as a zoo
   checkpoint (`DIR/<name>/`: model.json, variables.msgpack);
2. copies them into an independent PyTorch port of the architecture (below), checks
   that its logits equal the zoo's, and
3. exports the port with `torch.onnx.export` (dynamic batch) to `DIR/<name>/model.onnx`.

tests/test_onnx_import.py then checks that `onnx:DIR/<name>/model.onnx` gives the
logits of `ckpt:DIR/<name>`. Needs torch and onnxscript, which the project itself does
not (`pip install torch onnxscript`):

    python tests/data/onnx_zoo/make_fixtures.py [OUT_DIR]
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
import torch
from torch import nn

from opa_jax.models import checkpoint, load_model, zoo
from opa_jax.models.base import init_variables
from opa_jax.models.layers import scaled

HERE = os.path.dirname(os.path.abspath(__file__))
WIDTHS = {"nin": 0.125, "allconv": 0.125, "vgg16": 0.0625}
SEED = 0


class Normalize(nn.Module):
    """(pixels - mean) / std on [N, 3, H, W] float pixels 0-255, as the zoo models do."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def conv_bn_relu(in_channels, out_channels, kernel, stride=1, padding=None):
    padding = kernel // 2 if padding is None else padding
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, padding, bias=False),
        nn.BatchNorm2d(out_channels, eps=1e-5),
        nn.ReLU(),
    )


class TorchNiN(nn.Module):
    def __init__(self, module):
        super().__init__()
        w = lambda f: scaled(module.width, f)  # noqa: E731
        self.normalize = Normalize(module.mean, module.std)
        self.features = nn.Sequential(
            conv_bn_relu(3, w(192), 5), conv_bn_relu(w(192), w(160), 1),
            conv_bn_relu(w(160), w(96), 1), nn.MaxPool2d(3, 2, ceil_mode=True), nn.Dropout(),
            conv_bn_relu(w(96), w(192), 5), conv_bn_relu(w(192), w(192), 1),
            conv_bn_relu(w(192), w(192), 1),
            nn.AvgPool2d(3, 2, ceil_mode=True, count_include_pad=False), nn.Dropout(),
            conv_bn_relu(w(192), w(192), 3), conv_bn_relu(w(192), w(192), 1),
            nn.Conv2d(w(192), module.num_classes, 1),
        )  # fmt: skip
        self.names = ["conv1", "cccp1", "cccp2", "conv2", "cccp3", "cccp4", "conv3", "cccp5"]
        self.last = "cccp6"

    def forward(self, x):
        return self.features(self.normalize(x)).mean((2, 3))


class TorchAllConv(nn.Module):
    def __init__(self, module):
        super().__init__()
        w = lambda f: scaled(module.width, f)  # noqa: E731
        self.normalize = Normalize(module.mean, module.std)
        self.features = nn.Sequential(
            nn.Dropout(0.2),
            conv_bn_relu(3, w(96), 3), conv_bn_relu(w(96), w(96), 3),
            conv_bn_relu(w(96), w(96), 3, stride=2), nn.Dropout(),
            conv_bn_relu(w(96), w(192), 3), conv_bn_relu(w(192), w(192), 3),
            conv_bn_relu(w(192), w(192), 3, stride=2), nn.Dropout(),
            conv_bn_relu(w(192), w(192), 3, padding=0), conv_bn_relu(w(192), w(192), 1),
            nn.Conv2d(w(192), module.num_classes, 1),
        )  # fmt: skip
        self.names = [f"conv{i}" for i in range(1, 9)]
        self.last = "conv9"

    def forward(self, x):
        return self.features(self.normalize(x)).mean((2, 3))


class TorchVGG16(nn.Module):
    def __init__(self, module):
        super().__init__()
        from opa_jax.models.vgg import STAGES

        w = lambda f: scaled(module.width, f)  # noqa: E731
        self.normalize = Normalize(module.mean, module.std)
        layers, channels, self.names = [], 3, []
        for stage, widths in enumerate(STAGES, start=1):
            for i, features in enumerate(widths, start=1):
                layers.append(conv_bn_relu(channels, w(features), 3))
                channels = w(features)
                self.names.append(f"conv{stage}_{i}")
            layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        units = w(module.fc_units)
        self.classifier = nn.Sequential(
            nn.Linear(channels, units), nn.ReLU(), nn.Dropout(),
            nn.Linear(units, units), nn.ReLU(), nn.Dropout(),
            nn.Linear(units, module.num_classes),
        )  # fmt: skip
        self.dense = ["fc1", "fc2", "fc3"]

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(self.normalize(x)), 1))


PORTS = {"nin": TorchNiN, "allconv": TorchAllConv, "vgg16": TorchVGG16}


def with_random_batch_stats(variables, seed: int):
    """Batch-norm statistics and affine parameters drawn at random, so that the
    exported graphs' batch norms (folded or not) are not the identity."""
    rng = np.random.default_rng(seed)
    params, stats = jax.tree.map(np.asarray, (variables["params"], variables["batch_stats"]))
    for name, layer in stats.items():
        size = layer["mean"].shape
        layer["mean"] = rng.normal(0, 0.5, size).astype(np.float32)
        layer["var"] = rng.uniform(0.5, 2.0, size).astype(np.float32)
        params[name]["scale"] = rng.uniform(0.5, 1.5, size).astype(np.float32)
        params[name]["bias"] = rng.normal(0, 0.2, size).astype(np.float32)
    return {"params": params, "batch_stats": stats}


def copy_weights(port, variables):
    """The zoo's variables into the PyTorch port (kernels HWIO -> OIHW, dense [in, out] ->
    [out, in])."""
    params, stats = variables["params"], variables["batch_stats"]
    blocks = [m for m in port.features if isinstance(m, nn.Sequential)]
    with torch.no_grad():
        for block, name in zip(blocks, port.names, strict=True):
            conv, bn = block[0], block[1]
            conv.weight.copy_(torch.from_numpy(params[name]["kernel"].transpose(3, 2, 0, 1).copy()))
            bn.weight.copy_(torch.from_numpy(params[f"{name}_bn"]["scale"]))
            bn.bias.copy_(torch.from_numpy(params[f"{name}_bn"]["bias"]))
            bn.running_mean.copy_(torch.from_numpy(stats[f"{name}_bn"]["mean"]))
            bn.running_var.copy_(torch.from_numpy(stats[f"{name}_bn"]["var"]))
        if hasattr(port, "last"):
            last = port.features[-1]
            last.weight.copy_(torch.from_numpy(params[port.last]["kernel"].transpose(3, 2, 0, 1)))
            last.bias.copy_(torch.from_numpy(params[port.last]["bias"]))
        else:
            linears = [m for m in port.classifier if isinstance(m, nn.Linear)]
            for linear, name in zip(linears, port.dense, strict=True):
                linear.weight.copy_(torch.from_numpy(params[name]["kernel"].T))
                linear.bias.copy_(torch.from_numpy(params[name]["bias"]))


def make_fixture(name: str, out_dir: str) -> str:
    """Writes `out_dir/name/` (checkpoint and model.onnx); returns that directory."""
    width = WIDTHS[name]
    module = zoo.build(name, width=width)
    image_shape = zoo.ARCHITECTURES[name].image_shape
    variables = init_variables(module, jax.random.key(SEED), image_shape)
    variables = with_random_batch_stats(variables, SEED)
    path = os.path.join(out_dir, name)
    checkpoint.save_model_checkpoint(
        path, name, variables, {"model_config": {"width": width}, "purpose": "onnx fixture"}
    )
    zoo_model = load_model(f"ckpt:{path}")

    port = PORTS[name](module).eval()
    copy_weights(port, jax.tree.map(np.asarray, zoo_model.params))
    images = np.random.default_rng(1).uniform(0, 255, (4, *image_shape)).astype(np.float32)
    nchw = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        torch_logits = port(nchw).numpy()
    zoo_logits = np.asarray(zoo_model.apply_fn(zoo_model.params, images))
    error = np.abs(torch_logits - zoo_logits).max() / np.abs(zoo_logits).max()
    if error > 1e-5:
        raise SystemExit(f"{name}: the PyTorch port differs from the zoo ({error:.2e} relative)")
    torch.onnx.export(
        port, (nchw,), os.path.join(path, "model.onnx"), input_names=["images"],
        output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=False,
    )  # fmt: skip
    return path


def main(argv):
    out_dir = argv[1] if len(argv) > 1 else HERE
    for name in PORTS:
        print("wrote", make_fixture(name, out_dir))


if __name__ == "__main__":
    main(sys.argv)
