"""torchvision's and timm's families, exported by torch's own exporters, through the ONNX importer.

tests/data/onnx_torch/ holds small-width instances (scripts/make_onnx_fixtures.py;
manifest.json says which exporter and opset wrote each). Each file either loads and
matches onnxruntime's logits to 1e-4 of the largest logit, or, where the graph holds
operators the importer lacks, is refused with an error naming exactly those
operators. Needs no torch.
"""

import json
import pathlib

import numpy as np
import onnx
import onnxruntime
import pytest
from test_incremental import assert_matches_full, placements

from opa_jax import incremental
from opa_jax.errors import InputError
from opa_jax.incremental import thresholds
from opa_jax.models import onnx_import
from opa_jax.models.convention import InputConvention

FIXTURES = pathlib.Path(__file__).resolve().parent / "data" / "onnx_torch"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
FILES = [entry["file"] for entry in MANIFEST["files"]]


def missing_operators(proto) -> set[str]:
    return {node.op_type for node in proto.graph.node} - set(onnx_import.OPERATORS)


def test_every_fixture_is_in_the_manifest_and_small():
    assert sorted(p.name for p in FIXTURES.glob("*.onnx")) == sorted(FILES)
    assert max((FIXTURES / name).stat().st_size for name in FILES) < 800 * 1024


def test_every_common_family_of_torchvision_and_timm_has_a_fixture_from_both_exporters():
    made = {(entry["family"], entry["exporter"]) for entry in MANIFEST["files"]}
    torchvision = {"vit", "swin", "swin_v2", "maxvit", "convnext", "efficientnet_b0"}
    torchvision |= {"mobilenet_v2", "mobilenet_v3_small", "regnet", "resnext", "densenet"}
    timm = {"vit", "deit", "swin", "convnext", "efficientnet", "mobilenetv2", "mobilenetv3"}
    timm |= {"regnet", "resnet", "resnext", "densenet"}
    families = torchvision | {f"timm_{name}" for name in timm}
    for exporter in ("torchscript", "dynamo"):
        assert {(family, exporter) for family in families} <= made


@pytest.mark.parametrize("name", FILES)
def test_fixture_loads_and_matches_onnxruntime_or_names_its_missing_operators(name):
    path = str(FIXTURES / name)
    proto = onnx.load(path)
    entry = next(e for e in MANIFEST["files"] if e["file"] == name)
    assert entry["opset"] == next(
        o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")
    )
    missing = missing_operators(proto)
    if missing:
        with pytest.raises(InputError, match="unsupported operator") as raised:
            onnx_import.load_onnx_model(path, InputConvention(scale=1 / 255))
        unsupported = str(raised.value).split("; supported:")[0]
        assert all(f"({op})" in unsupported for op in missing), (missing, unsupported)
        return
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype(np.float32)
    model = onnx_import.load_onnx_model(path, InputConvention(scale=1 / 255))
    ours = np.asarray(model.apply_fn(model.params, pixels))
    runtime = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    inputs = {runtime.get_inputs()[0].name: (pixels / 255).transpose(0, 3, 1, 2)}
    theirs = runtime.run(None, inputs)[0]
    assert ours.shape == theirs.shape == (3, 10)
    # The logits depend on the image, so the comparison covers more than the head's bias.
    assert np.abs(theirs[0] - theirs[1]).max() > 1e-3 * np.abs(theirs).max()
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


TORCHSCRIPT = sorted(e["file"] for e in MANIFEST["files"] if e["exporter"] == "torchscript")


@pytest.mark.parametrize("name", TORCHSCRIPT)
def test_incremental_evaluator_is_exact_on_the_export_and_auto_follows_the_flop_ratio(name):
    """One pixel at the corners, borders and random places: the incremental logits equal
    the full pass's on every family's TorchScript export, and `auto` takes the incremental
    evaluator exactly when it saves 1.2x the FLOPs."""
    model = onnx_import.load_onnx_model(str(FIXTURES / name), InputConvention(scale=1 / 255))
    assert_matches_full(model, 1, placements(model.image_shape, 1, 12))
    flops = incremental.flops_per_query(model, 1)
    ratio = flops["full"] / flops["incremental"]
    chosen = incremental.make_evaluator("auto", model, 1)
    takes_incremental = ratio >= thresholds.AUTO_MIN_FLOP_RATIO
    assert isinstance(chosen, incremental.IncrementalEvaluator) == takes_incremental
    print(f"\n{name}: auto={chosen.name} flop ratio {ratio:.2f}")


def test_an_operator_the_importer_lacks_is_named(monkeypatch):
    monkeypatch.delitem(onnx_import.OPERATORS, "LayerNormalization")
    with pytest.raises(InputError, match=r"unsupported operator.*\(LayerNormalization\)"):
        onnx_import.load_onnx_model(str(FIXTURES / "vit_torchscript.onnx"))
