"""ONNX import: parity with onnxruntime, the zoo exported by PyTorch, and bad files.

Graphs are built here with `onnx.helper`; the zoo fixtures in tests/data/onnx_zoo were
exported by `torch.onnx.export` from PyTorch ports of NiN, All-CNN-C and VGG16 holding
the zoo checkpoints' weights (tests/data/onnx_zoo/make_fixtures.py).
"""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from opa_jax.errors import InputError
from opa_jax.models import convention, load_model
from opa_jax.models.onnx_import import load_onnx_model

REPO = pathlib.Path(__file__).resolve().parents[1]
ZOO = REPO / "tests" / "data" / "onnx_zoo"
RTOL = 1e-5  # max |imported - onnxruntime| / max |onnxruntime|


# ---------------------------------------------------------------------------
# Building graphs.


class GraphBuilder:
    """Nodes and random initializers, named in order; `save` writes the model."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.initializers, self.count = [], [], 0

    def const(self, array, name=None):
        name = name or f"c{len(self.initializers)}"
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, *shape, scale=None):
        scale = scale or 1.0 / np.sqrt(np.prod(shape[1:]) or 1)
        return self.const(self.rng.normal(0, scale, shape).astype(np.float32))

    def op(self, op_type, inputs, outputs=1, **attrs):
        self.count += 1
        names = [f"{op_type.lower()}{self.count}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=f"{op_type}_{self.count}",
                                           **attrs))  # fmt: skip
        return names[0] if outputs == 1 else names

    def conv(self, x, cin, cout, k=3, bias=True, **attrs):
        inputs = [x, self.weight(cout, cin // attrs.get("group", 1), k, k)]
        if bias:
            inputs.append(self.const(self.rng.normal(0, 0.1, cout).astype(np.float32)))
        return self.op("Conv", inputs, kernel_shape=[k, k], **attrs)

    def batch_norm(self, x, channels):
        params = [
            self.rng.uniform(0.5, 1.5, channels), self.rng.normal(0, 0.2, channels),
            self.rng.normal(0, 0.5, channels), self.rng.uniform(0.5, 2.0, channels),
        ]  # fmt: skip
        names = [self.const(p.astype(np.float32)) for p in params]
        return self.op("BatchNormalization", [x, *names], epsilon=1e-3)

    def gemm(self, x, k, m):
        w = self.weight(m, k)
        return self.op("Gemm", [x, w, self.const(self.rng.normal(0, 0.1, m).astype(np.float32))],
                       transB=1)  # fmt: skip

    def save(self, path, output, input_shape=("N", 3, 16, 16), opset=17, output_shape=("N", "K")):
        graph = helper.make_graph(
            self.nodes, "test_graph",
            [helper.make_tensor_value_info("images", TensorProto.FLOAT, list(input_shape))],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, list(output_shape))],
            self.initializers,
        )  # fmt: skip
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        onnx.save(model, str(path))
        return str(path)


def onnxruntime_logits(path, images, nchw=True):
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = images.transpose(0, 3, 1, 2) if nchw else images
    return session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(feed)})[0]


def imported_logits(path, images, **options):
    model = load_model(f"onnx:{path}", **options)
    return model, np.asarray(jax.jit(model.apply_fn)(model.params, images))


def random_images(n=3, size=16, seed=1):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


def assert_parity(got, want, rtol=RTOL):
    assert got.shape == want.shape
    error = np.abs(got - want).max() / np.abs(want).max()
    assert error <= rtol, f"relative error {error:.2e}"


def lenet_graph(b: GraphBuilder, x="images"):
    """LeNet-5 as PyTorch exports it: NCHW convs and pools, Flatten, Gemms."""
    x = b.op("Relu", [b.conv(x, 3, 6)])  # 16 -> 14
    x = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = b.op("Relu", [b.conv(x, 6, 16, pads=[1, 1, 1, 1])])
    x = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])  # [N, 16, 3, 3]
    x = b.op("Flatten", [x], axis=1)
    x = b.op("Relu", [b.gemm(x, 16 * 3 * 3, 32)])
    x = b.op("Relu", [b.gemm(x, 32, 24)])
    return b.gemm(x, 24, 10)


def resnet_graph(b: GraphBuilder, x="images"):
    """A small ResNet: batch norms, residual adds, a projection shortcut, ceil-mode pools."""
    x = b.op("Relu", [b.batch_norm(b.conv(x, 3, 8, bias=False, pads=[1, 1, 1, 1]), 8)])
    x = b.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)

    def block(x, cin, cout, stride):
        y = b.op("Relu", [b.batch_norm(b.conv(x, cin, cout, bias=False, pads=[1, 1, 1, 1],
                                              strides=[stride, stride]), cout)])  # fmt: skip
        y = b.batch_norm(b.conv(y, cout, cout, bias=False, pads=[1, 1, 1, 1]), cout)
        if stride != 1 or cin != cout:
            x = b.batch_norm(b.conv(x, cin, cout, k=1, bias=False, strides=[stride, stride]), cout)
        return b.op("Relu", [b.op("Add", [y, x])])

    x = block(x, 8, 8, 1)
    x = block(x, 8, 16, 2)
    x = b.op("AveragePool", [x], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)
    x = b.op("GlobalAveragePool", [x])
    x = b.op("Flatten", [x])
    return b.gemm(x, 16, 10)


# ---------------------------------------------------------------------------
# Parity with onnxruntime.


def test_lenet_like_graph_matches_onnxruntime(tmp_path):
    b = GraphBuilder()
    path = b.save(tmp_path / "lenet.onnx", lenet_graph(b))
    images = random_images()
    model, logits = imported_logits(path, images)
    assert_parity(logits, onnxruntime_logits(path, images))
    assert model.image_shape == (16, 16, 3) and model.num_classes == 10
    assert model.meta["input"]["layout"] == "NCHW"
    # Converted once at load: OIHW kernels are HWIO, and the first Gemm's rows follow
    # the channels-last flattening (H, W, C order) instead of PyTorch's C, H, W.
    kernel = model.params["Conv_1"]["kernel"]
    assert kernel.shape == (3, 3, 3, 6)
    gemm = b.initializers[4]  # Conv_1 W, B, Conv_4 W, B, then the first Gemm's W
    rows = numpy_helper.to_array(gemm).T.reshape(16, 3, 3, 32).transpose(1, 2, 0, 3)
    np.testing.assert_array_equal(model.params["Gemm_8"]["kernel"], rows.reshape(144, 32))


def test_resnet_like_graph_matches_onnxruntime(tmp_path):
    b = GraphBuilder(seed=3)
    path = b.save(tmp_path / "resnet.onnx", resnet_graph(b), input_shape=("N", 3, 15, 15))
    images = random_images(size=15)
    _, logits = imported_logits(path, images)
    assert_parity(logits, onnxruntime_logits(path, images))


def flattened(b, x):
    return b.op("Flatten", [x], axis=1)


# (name, build(builder, x) -> output, input size); each ends in a Flatten or [N, C].
OP_CASES = {
    "conv_groups_strides_dilations_asymmetric_pads": lambda b, x: flattened(b, b.conv(
        b.conv(x, 3, 8, pads=[1, 1, 1, 1]), 8, 8, group=4, strides=[2, 1], dilations=[2, 1],
        pads=[0, 1, 2, 1])),
    "conv_depthwise_same_upper": lambda b, x: flattened(b, b.conv(
        b.conv(x, 3, 6), 6, 6, k=4, group=6, auto_pad="SAME_UPPER", strides=[2, 2])),
    "conv_same_lower_no_bias": lambda b, x: flattened(b, b.conv(
        x, 3, 4, k=2, bias=False, auto_pad="SAME_LOWER")),
    "maxpool_ceil_pads_dilations": lambda b, x: flattened(b, b.op(
        "MaxPool", [x], kernel_shape=[3, 2], strides=[2, 3], pads=[1, 0, 1, 1], ceil_mode=1,
        dilations=[1, 2])),
    "averagepool_ceil_count_include_pad": lambda b, x: flattened(b, b.op(
        "AveragePool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1,
        count_include_pad=1)),
    "averagepool_ceil_exclude_pad": lambda b, x: flattened(b, b.op(
        "AveragePool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 0, 0], ceil_mode=1,
        count_include_pad=0)),
    "averagepool_floor_same_upper": lambda b, x: flattened(b, b.op(
        "AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_UPPER")),
    "activations_and_clip": lambda b, x: flattened(b, b.op("Clip", [
        b.op("Tanh", [b.op("Sigmoid", [b.op("LeakyRelu", [b.op("Sub", [
            x, b.const(np.float32(100.0))])], alpha=0.2)])]),
        b.const(np.float32(-0.5)), b.const(np.float32(0.5))])),
    "per_channel_constants_both_sides": lambda b, x: flattened(b, b.op("Div", [
        b.const(np.linspace(1, 2, 3, dtype=np.float32).reshape(3, 1, 1)),
        b.op("Add", [b.op("Mul", [x, b.const(np.float32([[[0.5]], [[2.0]], [[-1.0]]]))]),
                     b.const(np.full((1, 3, 1, 1), 300.0, np.float32))])])),
    "concat_channels_and_pad_modes": lambda b, x: flattened(b, b.op("Concat", [
        b.op("Pad", [x, b.const(np.int64([0, 0, 1, 2, 0, 0, 2, 1])), b.const(np.float32(7.0))]),
        b.op("Pad", [x, b.const(np.int64([0, 0, 1, 2, 0, 0, 2, 1]))], mode="reflect"),
        b.op("Pad", [x, b.const(np.int64([0, 0, 1, 2, 0, 0, 2, 1]))], mode="edge"),
    ], axis=1)),
    "global_max_pool_matmul_dropout_identity": lambda b, x: b.op("MatMul", [
        b.op("Identity", [b.op("Dropout", [flattened(b, b.op("GlobalMaxPool", [x]))],
                              outputs=2)[0]]),  # an unused mask output
        b.weight(3, 5)]),
    "flatten_then_matmul": lambda b, x: b.op("MatMul", [
        flattened(b, b.op("MaxPool", [x], kernel_shape=[4, 4], strides=[4, 4], outputs=2)[0]),
        b.weight(48, 7)]),  # MaxPool's Indices output is unused
    "reshape_from_shape_arithmetic": lambda b, x: b.gemm(b.op("Reshape", [
        b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2]),
        b.op("Concat", [
            b.op("Unsqueeze", [b.op("Gather", [b.op("Shape", [x]), b.const(np.int64(0))],
                                    axis=0), b.const(np.int64([0]))]),
            b.const(np.int64([-1]))], axis=0)]), 3 * 8 * 8, 10),
    "reduce_mean_transposes": lambda b, x: b.op("Transpose", [b.op("Transpose", [b.op(
        "ReduceMean", [b.conv(x, 3, 5)], axes=[2, 3], keepdims=0)], perm=[1, 0])], perm=[1, 0]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_operator_matches_onnxruntime(tmp_path, case):
    b = GraphBuilder(seed=5)
    output = OP_CASES[case](b, "images")
    path = b.save(tmp_path / f"{case}.onnx", output)
    images = random_images()
    _, logits = imported_logits(path, images)
    assert_parity(logits, onnxruntime_logits(path, images))


def test_channels_last_graph_with_transposes(tmp_path):
    """A tf2onnx-style graph: NHWC input, Transpose to NCHW before the convs."""
    b = GraphBuilder(seed=7)
    x = b.op("Transpose", ["images"], perm=[0, 3, 1, 2])
    x = b.op("Relu", [b.conv(x, 3, 4, pads=[1, 1, 1, 1])])
    x = b.op("Transpose", [x], perm=[0, 2, 3, 1])  # back to NHWC: a Keras Flatten
    output = b.gemm(b.op("Flatten", [x]), 16 * 16 * 4, 10)
    path = b.save(tmp_path / "nhwc.onnx", output, input_shape=("N", 16, 16, 3))
    images = random_images()
    model, logits = imported_logits(path, images)
    assert model.meta["input"]["layout"] == "NHWC"
    assert_parity(logits, onnxruntime_logits(path, images, nchw=False))


def test_batch_one_graph_is_mapped_over_the_batch(tmp_path):
    """A graph exported with batch 1 and a Reshape to [1, -1] still attacks in batches."""
    b = GraphBuilder(seed=8)
    x = b.op("MaxPool", [b.conv("images", 3, 4, pads=[1, 1, 1, 1])], kernel_shape=[4, 4],
             strides=[4, 4])  # fmt: skip
    output = b.gemm(b.op("Reshape", [x, b.const(np.int64([1, -1]))]), 4 * 4 * 4, 10)
    path = b.save(tmp_path / "batch1.onnx", output, input_shape=(1, 3, 16, 16))
    images = random_images(n=3)
    model, logits = imported_logits(path, images)
    want = np.concatenate([onnxruntime_logits(path, images[i : i + 1]) for i in range(3)])
    assert_parity(logits, want)
    assert model.meta["input"]["batch"].startswith("1")


def test_final_softmax_is_dropped(tmp_path):
    b = GraphBuilder(seed=9)
    logits_name = lenet_graph(b)
    without = b.save(tmp_path / "logits.onnx", logits_name)
    b.op("Softmax", [logits_name], axis=1)
    with_softmax = b.save(tmp_path / "probs.onnx", b.nodes[-1].output[0])
    images = random_images() / 50  # moderate logits, so the probabilities are not all 0 or 1
    model, logits = imported_logits(with_softmax, images)
    assert model.meta["dropped_final"] == "Softmax"
    assert_parity(logits, onnxruntime_logits(without, images))
    probs = np.asarray(jax.nn.softmax(logits))
    np.testing.assert_allclose(probs, onnxruntime_logits(with_softmax, images), atol=1e-6)


@pytest.mark.parametrize("name", ["imagenet", "cifar10", "unit", "keras_cifar10"])
def test_input_convention_feeds_the_graph_its_normalised_input(tmp_path, name):
    b = GraphBuilder(seed=10)
    path = b.save(tmp_path / "lenet.onnx", lenet_graph(b))
    images = random_images()
    chosen = convention.named(name)
    _, logits = imported_logits(path, images, input_convention=chosen)
    normalised = (images * chosen.scale - np.float32(chosen.mean)) / np.float32(chosen.std)
    assert_parity(logits, onnxruntime_logits(path, normalised.astype(np.float32)))


def test_bgr_channel_order_and_config_fields(tmp_path):
    from ml_collections import ConfigDict

    b = GraphBuilder(seed=11)
    path = b.save(tmp_path / "lenet.onnx", lenet_graph(b), input_shape=("N", 3, "H", "W"))
    section = ConfigDict({"normalization": "imagenet", "scale": None, "mean": "100,110,120",
                          "std": "", "channel_order": "bgr", "image_size": "16,16"})  # fmt: skip
    images = random_images()
    model, logits = imported_logits(path, images, onnx=section)
    assert model.image_shape == (16, 16, 3)
    std = np.float32([0.229, 0.224, 0.225])
    normalised = (images[..., ::-1] / np.float32(255) - np.float32([100, 110, 120])) / std
    assert_parity(logits, onnxruntime_logits(path, normalised.astype(np.float32)))


# ---------------------------------------------------------------------------
# The zoo, exported by PyTorch.


@pytest.mark.parametrize("name", ["nin", "allconv", "vgg16"])
def test_zoo_exported_by_pytorch_gives_the_zoo_logits(name):
    zoo_model = load_model(f"ckpt:{ZOO / name}")
    onnx_model = load_model(f"onnx:{ZOO / name / 'model.onnx'}")
    assert onnx_model.meta["producer"].startswith("pytorch")
    images = np.random.default_rng(2).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    want = np.asarray(zoo_model.apply_fn(zoo_model.params, images))
    got = np.asarray(jax.jit(onnx_model.apply_fn)(onnx_model.params, images))
    assert_parity(got, want)
    assert np.array_equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.slow
def test_fixtures_regenerate_with_the_installed_pytorch(tmp_path):
    """The PyTorch route end to end, when torch is installed (it is not a dependency)."""
    pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    sys.path.insert(0, str(ZOO))
    import make_fixtures

    path = make_fixtures.make_fixture("nin", str(tmp_path))
    model = load_model(f"onnx:{path}/model.onnx")
    zoo_model = load_model(f"ckpt:{path}")
    images = random_images(n=2, size=32)
    assert_parity(np.asarray(model.apply_fn(model.params, images)),
                  np.asarray(zoo_model.apply_fn(zoo_model.params, images)))  # fmt: skip


# ---------------------------------------------------------------------------
# Bad input.


def test_unsupported_operator_names_file_node_and_operator(tmp_path):
    b = GraphBuilder()
    x = b.op("LRN", [b.conv("images", 3, 4)], size=3)
    path = b.save(tmp_path / "lrn.onnx", flattened(b, x))
    with pytest.raises(InputError, match=r"lrn\.onnx.*'LRN_2' \(LRN\).*supported: "):
        load_onnx_model(path)


def test_custom_domain_operator_is_unsupported(tmp_path):
    b = GraphBuilder()
    b.nodes.append(
        helper.make_node("Gelu", ["images"], ["g"], name="fancy", domain="com.microsoft")
    )
    graph = helper.make_graph(
        b.nodes + [helper.make_node("Flatten", ["g"], ["out"], name="flat")], "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", "K"])],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    path = str(tmp_path / "custom.onnx")
    onnx.save(model, path)
    with pytest.raises(InputError, match=r"'fancy' \(com\.microsoft\.Gelu\)"):
        load_onnx_model(path)


def test_malformed_and_missing_files(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07\x12\x03abc" + bytes(range(256)) * 3)
    with pytest.raises(InputError, match="garbage.onnx"):
        load_onnx_model(str(garbage))
    b = GraphBuilder()
    good = b.save(tmp_path / "good.onnx", lenet_graph(b))
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(pathlib.Path(good).read_bytes()[:2000])
    with pytest.raises(InputError, match="truncated.onnx"):
        load_onnx_model(str(truncated))
    with pytest.raises(InputError, match="file not found"):
        load_onnx_model(str(tmp_path / "missing.onnx"))
    external = tmp_path / "external.onnx"  # weights in a separate file, as torch writes them
    onnx.save(onnx.load(good), str(external), save_as_external_data=True, location="w.data",
              size_threshold=0)  # fmt: skip
    assert np.isfinite(imported_logits(str(external), random_images())[1]).all()
    (tmp_path / "w.data").unlink()
    with pytest.raises(InputError, match=r"external.onnx.*w\.data.*beside"):
        load_onnx_model(str(external))
    with pytest.raises(InputError, match="not a file"):
        load_onnx_model(str(tmp_path))


def test_unfixable_shapes_are_refused(tmp_path):
    b = GraphBuilder()
    dynamic = b.save(tmp_path / "dynamic.onnx", lenet_graph(b), input_shape=("N", 3, "H", "W"))
    with pytest.raises(InputError, match=r"dynamic.*onnx\.image_size"):
        load_onnx_model(dynamic)
    with pytest.raises(InputError, match=r"node 'Gemm_8' \(Gemm\)"):  # fixed, but too small
        load_onnx_model(dynamic, image_size=(12, 12))
    b = GraphBuilder()
    fixed = b.save(tmp_path / "fixed.onnx", lenet_graph(b), input_shape=(8, 3, 16, 16))
    with pytest.raises(InputError, match="fixed batch of 8"):
        load_onnx_model(fixed)
    b = GraphBuilder()
    x = b.op("Reshape", [b.conv("images", 3, 2), b.const(np.int64([2, -1]))])  # batch 2 baked in
    baked = b.save(tmp_path / "baked.onnx", x)
    with pytest.raises(InputError, match="fixes its batch size"):
        load_onnx_model(baked)
    b = GraphBuilder()
    spatial = b.save(tmp_path / "spatial.onnx", b.conv("images", 3, 4), output_shape=[2, 4, 14, 14])
    with pytest.raises(
        InputError, match=r"has shape \[2, 4, 14, 14\]; expected \[batch, classes\]"
    ):
        load_onnx_model(spatial)


def test_bad_files_exit_2_through_scripts_attack(tmp_path):
    b = GraphBuilder()
    unsupported = b.save(tmp_path / "lrn.onnx", flattened(b, b.op("LRN", ["images"], size=3)))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx model at all")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for spec, message in (
        (f"onnx:{unsupported}", "(LRN)"),
        (f"onnx:{garbage}", "garbage.onnx"),
        (f"onnx:{tmp_path / 'missing.onnx'}", "file not found"),
    ):
        done = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "attack.py"),
             f"--config={REPO / 'configs' / 'default.py'}", f"--config.model={spec}",
             f"--workdir={tmp_path / 'run'}"],
            env=env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr[-2000:]
        assert message in done.stderr
