"""Writes tests/data/onnx_torch/: small-width torchvision and timm families exported to ONNX.

    nice -n 10 python scripts/make_onnx_fixtures.py [--out=tests/data/onnx_torch] [--families=a,b]

Each architecture of `opa_jax.models.torch_fixtures.FAMILIES` and, when timm is
installed, `TIMM_FAMILIES` (random weights, seed 0, 10 classes, 32x32 images,
at most a few hundred thousand parameters), or those of --families, is exported with
the TorchScript exporter at opset 17, and with the dynamo exporter at its
default opset when onnxscript is installed, as FAMILY_EXPORTER.onnx, and
manifest.json records what each file is (the entries of families not
rewritten are kept). tests/test_onnx_torch_fixtures.py
loads them with opa_jax and compares with onnxruntime; it needs no torch.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from opa_jax.models import torch_fixtures  # noqa: E402

_OUT = flags.DEFINE_string("out", "tests/data/onnx_torch", "Where the .onnx files go.")
_FAMILIES = flags.DEFINE_list("families", [], "Families to write (default: all available).")


def main(argv):
    del argv
    for entry in torch_fixtures.write_fixtures(_OUT.value, _FAMILIES.value or None):
        size = f"{entry['bytes'] // 1024} KB, {entry['params']} parameters"
        print(f"{entry['file']}: opset {entry['opset']}, {size}")


if __name__ == "__main__":
    app.run(main)
