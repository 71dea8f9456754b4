"""Small-width instances of torchvision's and timm's families, for the ONNX fixtures of the tests.

`FAMILIES` (torchvision) and `TIMM_FAMILIES` build each architecture at a width
that keeps its .onnx file under 800 KB (random weights, seed 0, 10 classes, 32x32 images), with
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


def _mobilenet_v2():
    from torchvision.models import MobileNetV2

    settings = [[1, 16, 1, 1], [6, 24, 1, 2], [6, 32, 1, 2]]  # t, c, n, s: three stages
    return MobileNetV2(NUM_CLASSES, width_mult=0.25, inverted_residual_setting=settings)


def _regnet():
    from torchvision.models import RegNet
    from torchvision.models.regnet import BlockParams

    params = BlockParams.from_init_params(
        depth=2, w_0=8, w_a=8.0, w_m=2.0, group_width=4, se_ratio=0.25
    )
    return RegNet(params, num_classes=NUM_CLASSES, stem_width=8)


def _resnext():
    """ResNeXt's stem and first stage (bottlenecks of 4 groups); the later stages, at
    torchvision's fixed widths, would make a file of megabytes."""
    import torch
    from torchvision.models import ResNet
    from torchvision.models.resnet import Bottleneck

    module = ResNet(Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=4)
    module.layer2 = module.layer3 = module.layer4 = torch.nn.Identity()
    module.fc = torch.nn.Linear(256, NUM_CLASSES)
    return module


def _densenet():
    from torchvision.models import DenseNet

    return DenseNet(4, (1, 1), num_init_features=8, bn_size=2, num_classes=NUM_CLASSES)


def _timm_vit(distilled: bool):
    from timm.models import deit, vision_transformer

    kind = deit.VisionTransformerDistilled if distilled else vision_transformer.VisionTransformer
    return kind(
        img_size=IMAGE_SIZE,
        patch_size=8,
        embed_dim=16,
        depth=1,
        num_heads=2,
        mlp_ratio=2,
        num_classes=NUM_CLASSES,
    )


def _timm_swin():
    from timm.models import swin_transformer

    return swin_transformer.SwinTransformer(
        img_size=IMAGE_SIZE,
        patch_size=4,
        window_size=4,
        embed_dim=16,
        depths=(1, 1),
        num_heads=(1, 2),
        num_classes=NUM_CLASSES,
    )


def _timm_convnext():
    from timm.models import convnext

    return convnext.ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), num_classes=NUM_CLASSES)


def _timm_mobile(generator: str, variant: str):
    """timm's EfficientNet, MobileNetV2 and MobileNetV3 builders at a quarter of the width
    and depth."""
    from timm.models import efficientnet, mobilenetv3

    build = getattr(efficientnet, generator, None) or getattr(mobilenetv3, generator)
    module = build(variant, 0.25, 0.25, num_classes=NUM_CLASSES)
    if isinstance(module, mobilenetv3.MobileNetV3):  # a head of 64 features, not 1,024
        import torch

        module.conv_head = torch.nn.Conv2d(module.conv_head.in_channels, 64, 1)
        module.classifier = torch.nn.Linear(64, NUM_CLASSES)
    return module


def _timm_regnet():
    from timm.models import regnet

    config = regnet.RegNetCfg(depth=4, w0=8, wa=16, wm=1.5, group_size=8, se_ratio=0.25)
    return regnet.RegNet(config, num_classes=NUM_CLASSES, stem_width=8)


def _timm_resnet(bottleneck: bool):
    """timm's ResNet at widths 8 to 64; with `bottleneck`, ResNeXt's 4-group bottlenecks."""
    from timm.models import resnet

    block, groups = (
        (resnet.Bottleneck, {"cardinality": 4, "base_width": 32})
        if bottleneck
        else (resnet.BasicBlock, {})
    )
    return resnet.ResNet(
        block,
        (1, 1, 1, 1),
        channels=(8, 16, 32, 64),
        stem_width=8,
        num_classes=NUM_CLASSES,
        **groups,
    )


def _timm_densenet():
    from timm.models import densenet

    return densenet.DenseNet(growth_rate=4, block_config=(1, 1), bn_size=2, num_classes=NUM_CLASSES)


FAMILIES: dict[str, Callable] = {
    "mobilenet_v3_small": _mobilenet_v3_small,
    "efficientnet_b0": _efficientnet_b0,
    "shufflenet_v2": _shufflenet_v2,
    "convnext": _convnext,
    "vit": _vit,
    "swin": lambda: _swin(1),
    "swin_v2": lambda: _swin(2),
    "maxvit": _maxvit,
    "mobilenet_v2": _mobilenet_v2,
    "regnet": _regnet,
    "resnext": _resnext,
    "densenet": _densenet,
}

# timm's common families (timm's own modules; `write_fixtures` skips them without timm).
TIMM_FAMILIES: dict[str, Callable] = {
    "timm_vit": lambda: _timm_vit(False),
    "timm_deit": lambda: _timm_vit(True),
    "timm_swin": _timm_swin,
    "timm_convnext": _timm_convnext,
    "timm_efficientnet": lambda: _timm_mobile("_gen_efficientnet", "efficientnet_b0"),
    "timm_mobilenetv2": lambda: _timm_mobile("_gen_mobilenet_v2", "mobilenetv2_100"),
    "timm_mobilenetv3": lambda: _timm_mobile("_gen_mobilenet_v3", "mobilenetv3_small_100"),
    "timm_regnet": _timm_regnet,
    "timm_resnet": lambda: _timm_resnet(False),
    "timm_resnext": lambda: _timm_resnet(True),
    "timm_densenet": _timm_densenet,
}


def build(family: str):
    """The family's small instance, random weights (seed 0, no all-zero head), eval mode."""
    import torch

    torch.manual_seed(0)
    make = FAMILIES.get(family) or TIMM_FAMILIES[family]
    return nonzero_heads(make()).eval()


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


def available_families() -> list[str]:
    """`FAMILIES`, and `TIMM_FAMILIES` when timm is installed."""
    try:
        import timm  # noqa: F401
    except ImportError:
        return list(FAMILIES)
    return list(FAMILIES) + list(TIMM_FAMILIES)


def write_fixtures(out: str, families: list[str] | None = None) -> list[dict]:
    """Exports each of `families` (default: `available_families()`) with every exporter of
    `exports()` into `out`, and records them in manifest.json beside the files of other
    families already there; returns the new entries."""
    import onnx
    import torch

    os.makedirs(out, exist_ok=True)
    families = families or available_families()
    entries = []
    for family in families:
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
    _write_manifest(out, entries, torch.__version__)
    return entries


def _write_manifest(out: str, entries: list[dict], torch_version: str) -> None:
    """manifest.json: the entries of earlier files whose family was not rewritten, then
    `entries`."""
    path = os.path.join(out, "manifest.json")
    kept = []
    if os.path.exists(path):
        with open(path) as f:
            rewritten = {entry["family"] for entry in entries}
            kept = [e for e in json.load(f)["files"] if e["family"] not in rewritten]
    manifest = {
        "made_by": "scripts/make_onnx_fixtures.py",
        "torch": torch_version,
        "image_size": IMAGE_SIZE,
        "input": "[batch, 3, 32, 32] float [0, 1] pixels; output [batch, 10] logits",
        "files": kept + entries,
    }
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
