"""Writes tests/data/onnx_torch/: small-width torchvision families exported to ONNX.

    nice -n 10 python scripts/make_onnx_fixtures.py [--out=tests/data/onnx_torch]

Each architecture of `opa_jax.models.torch_fixtures.FAMILIES` (random weights,
seed 0, 10 classes, 32x32 images, a few thousand parameters) is exported with
the TorchScript exporter at opset 17, and with the dynamo exporter at its
default opset when onnxscript is installed, as FAMILY_EXPORTER.onnx, and
manifest.json records what each file is. tests/test_onnx_torch_fixtures.py
loads them with opa_jax and compares with onnxruntime; it needs no torch.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from opa_jax.models import torch_fixtures  # noqa: E402

_OUT = flags.DEFINE_string("out", "tests/data/onnx_torch", "Where the .onnx files go.")


def main(argv):
    del argv
    for entry in torch_fixtures.write_fixtures(_OUT.value):
        print(f"{entry['file']}: opset {entry['opset']}, {entry['bytes'] // 1024} KB, "
              f"{entry['params']} parameters")  # fmt: skip


if __name__ == "__main__":
    app.run(main)
