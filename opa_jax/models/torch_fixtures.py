"""Small-width instances of torchvision's families, for the ONNX fixtures of the tests.

`FAMILIES` builds each architecture at a width that keeps its .onnx file to a
few hundred KB at most (random weights, seed 0, 10 classes, 32x32 images), with
the operators its full-size sibling exports. `write_fixtures` exports them
(scripts/make_onnx_fixtures.py); tests/test_onnx_torch_fixtures.py reads the
files and needs no torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from opa_jax.models import torch_export

IMAGE_SIZE = 32
NUM_CLASSES = 10


def _mobilenet_v3_small():
    from torchvision.models import mobilenetv3

    settings, last_channel = mobilenetv3._mobilenet_v3_conf(
        "mobilenet_v3_small", width_mult=0.25, reduced_tail=True
    )
    return mobilenetv3.MobileNetV3(settings, last_channel // 4, num_classes=NUM_CLASSES)


def _efficientnet_b0():
    from torchvision.models import efficientnet

    settings, last_channel = efficientnet._efficientnet_conf(
        "efficientnet_b0", width_mult=0.25, depth_mult=0.25
    )
    return efficientnet.EfficientNet(settings, 0.2, num_classes=NUM_CLASSES, last_channel=64)


def _vit():
    from torchvision.models import VisionTransformer

    return VisionTransformer(
        image_size=IMAGE_SIZE,
        patch_size=8,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
        num_classes=NUM_CLASSES,
    )


def _swin(version: int):
    from torchvision.models import SwinTransformer, swin_transformer

    blocks = (
        {}
        if version == 1
        else {
            "block": swin_transformer.SwinTransformerBlockV2,
            "downsample_layer": swin_transformer.PatchMergingV2,
        }
    )
    return SwinTransformer(
        patch_size=[4, 4],
        embed_dim=16,
        depths=[1, 1],
        num_heads=[1, 2],
        window_size=[4, 4],
        num_classes=NUM_CLASSES,
        **blocks,
    )


def _convnext():
    from torchvision.models import ConvNeXt
    from torchvision.models.convnext import CNBlockConfig

    settings = [CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)]
    return ConvNeXt(settings, num_classes=NUM_CLASSES)


def _shufflenet_v2():
    from torchvision.models import ShuffleNetV2

    return ShuffleNetV2([1, 1, 1], [8, 16, 32, 64, 128], num_classes=NUM_CLASSES)


def _maxvit():
    from torchvision.models import MaxVit

    return MaxVit(
        input_size=(IMAGE_SIZE, IMAGE_SIZE),
        stem_channels=8,
        partition_size=4,
        block_channels=[16],
        block_layers=[1],
        head_dim=8,
        stochastic_depth_prob=0.0,
        num_classes=NUM_CLASSES,
    )


FAMILIES: dict[str, Callable] = {
    "mobilenet_v3_small": _mobilenet_v3_small,
    "efficientnet_b0": _efficientnet_b0,
    "shufflenet_v2": _shufflenet_v2,
    "convnext": _convnext,
    "vit": _vit,
    "swin": lambda: _swin(1),
    "swin_v2": lambda: _swin(2),
    "maxvit": _maxvit,
}


def build(family: str):
    """The family's small instance, random weights (seed 0, no all-zero head), eval mode."""
    import torch

    torch.manual_seed(0)
    return nonzero_heads(FAMILIES[family]()).eval()


def nonzero_heads(module):
    """The module with random weights in place of all-zero linear layers: torchvision
    zero-initialises ViT's head, which leaves logits that do not depend on the image."""
    import torch

    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, torch.nn.Linear) and not layer.weight.any():
                torch.nn.init.normal_(layer.weight, std=0.5)
    return module


def exports() -> list[tuple[str, int | None]]:
    """(exporter, opset): TorchScript at 17, and dynamo at its default when onnxscript is
    installed."""
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return [("torchscript", 17)]
    return [("torchscript", 17), ("dynamo", None)]


def write_fixtures(out: str) -> list[dict]:
    """Exports every family with every exporter of `exports()` into `out`, with
    manifest.json; returns the manifest's entries."""
    import onnx
    import torch

    os.makedirs(out, exist_ok=True)
    entries = []
    for family in FAMILIES:
        module = build(family)
        params = sum(p.numel() for p in module.parameters())
        for exporter, opset in exports():
            onnx_bytes = torch_export.export_onnx(
                module, (IMAGE_SIZE, IMAGE_SIZE, 3), exporter=exporter, opset=opset
            )
            proto = onnx.load_model_from_string(onnx_bytes)
            name = f"{family}_{exporter}.onnx"
            with open(os.path.join(out, name), "wb") as f:
                f.write(onnx_bytes)
            entries.append(
                {
                    "file": name,
                    "family": family,
                    "exporter": exporter,
                    "opset": next(
                        e.version for e in proto.opset_import if e.domain in ("", "ai.onnx")
                    ),
                    "params": int(params),
                    "bytes": len(onnx_bytes),
                    "operators": sorted({node.op_type for node in proto.graph.node}),
                }
            )
    manifest = {
        "made_by": "scripts/make_onnx_fixtures.py",
        "torch": torch.__version__,
        "image_size": IMAGE_SIZE,
        "input": "[batch, 3, 32, 32] float [0, 1] pixels; output [batch, 10] logits",
        "files": entries,
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    return entries
