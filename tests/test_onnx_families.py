"""ONNX import of transformers and modern CNNs: parity with onnxruntime, and exactness of
the incremental evaluator on each family.

Each family is a small graph built here with `onnx.helper`, written the way PyTorch's
exporter writes the real network (shape arithmetic on `Shape` included), at a few layers,
small width and a 16x16 or 32x32 image. Logits agree with onnxruntime within 1e-4 x the
largest |logit|.
"""

import jax
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from test_incremental import assert_matches_full, placements
from test_onnx_import import GraphBuilder, imported_logits, onnxruntime_logits

from opa_jax import incremental
from opa_jax.errors import InputError
from opa_jax.incremental import thresholds
from opa_jax.models.onnx_import import load_onnx_model

TOLERANCE = 1e-4  # max |imported - onnxruntime| / max |onnxruntime|


def save(b: GraphBuilder, path, output, input_shape=("N", 3, 16, 16), opset=20):
    """The graph as a model file, with the IR version its opset needs."""
    graph = helper.make_graph(
        b.nodes,
        "family",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", "K"])],
        b.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9 if opset <= 20 else 10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def images_for(shape, n=3, seed=1):
    """Random pixels [n, H, W, C] for an NCHW input shape ("N", C, H, W)."""
    _, c, h, w = shape
    return np.random.default_rng(seed).uniform(0, 255, (n, h, w, c)).astype(np.float32)


def assert_close(got, want):
    assert got.shape == want.shape
    error = np.abs(got - want).max() / np.abs(want).max()
    assert error <= TOLERANCE, f"relative error {error:.2e}"
    return error


# ---------------------------------------------------------------------------
# Building blocks, as the PyTorch exporter writes them.


def ints(b, *values):
    return b.const(np.int64(values))


def bias(b, n):
    return b.const(b.rng.normal(0, 0.1, n).astype(np.float32))


def dim(b, x, axis):
    """x.size(axis) as a 1-element int64 tensor: Shape, Gather, Unsqueeze."""
    size = b.op("Gather", [b.op("Shape", [x]), b.const(np.int64(axis))], axis=0)
    return b.op("Unsqueeze", [size, ints(b, 0)])


def linear(b, x, k, m):
    """nn.Linear on [..., k]: MatMul by the transposed weight, then Add the bias."""
    return b.op("Add", [b.op("MatMul", [x, b.weight(k, m)]), bias(b, m)])


def layer_norm(b, x, c, epsilon=1e-6):
    scale = b.const(b.rng.uniform(0.5, 1.5, c).astype(np.float32))
    return b.op("LayerNormalization", [x, scale, bias(b, c)], axis=-1, epsilon=epsilon)


def gelu_erf(b, x):
    """GELU as exporters before opset 20 write it: x * 0.5 * (1 + erf(x / sqrt(2)))."""
    erf = b.op("Erf", [b.op("Div", [x, b.const(np.float32(np.sqrt(2.0)))])])
    half = b.op("Mul", [x, b.op("Add", [erf, b.const(np.float32(1.0))])])
    return b.op("Mul", [half, b.const(np.float32(0.5))])


def attention(b, x, c, heads, bias_and_mask=None, split_form="num_outputs"):
    """Multi-head self-attention on tokens [B, T, c] (timm's Attention): qkv, Reshape to
    [B, T, 3, heads, d], Transpose, Split, q @ k^T * scale, Softmax, @ v, projection."""
    head_dim = c // heads
    qkv = linear(b, x, c, 3 * c)
    target = b.op("Concat", [dim(b, x, 0), dim(b, x, 1), ints(b, 3, heads, head_dim)], axis=0)
    qkv = b.op("Transpose", [b.op("Reshape", [qkv, target])], perm=[2, 0, 3, 1, 4])
    if split_form == "num_outputs":  # opset 18
        parts = b.op("Split", [qkv], outputs=3, axis=0, num_outputs=3)
    else:  # opset 13
        parts = b.op("Split", [qkv, ints(b, 1, 1, 1)], outputs=3, axis=0)
    q, k, v = (b.op("Squeeze", [p, ints(b, 0)]) for p in parts)  # [B, heads, T, d]
    # scale = 1 / sqrt(head_dim), computed from the shape as exporters do
    d = b.op("Cast", [b.op("Gather", [b.op("Shape", [q]), b.const(np.int64(-1))])], to=1)
    scale = b.op("Div", [b.const(np.float32(1.0)), b.op("Sqrt", [d])])
    scores = b.op("Mul", [b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])]), scale])
    if bias_and_mask is not None:
        scores = bias_and_mask(scores)
    probs = b.op("Softmax", [scores], axis=-1)
    out = b.op("Transpose", [b.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
    out = b.op("Reshape", [out, b.op("Concat", [dim(b, x, 0), dim(b, x, 1), ints(b, -1)],
                                     axis=0)])  # fmt: skip
    return linear(b, out, c, c)


def mlp(b, x, c, hidden, gelu="none"):
    h = linear(b, x, c, hidden)
    h = gelu_erf(b, h) if gelu == "erf" else b.op("Gelu", [h], approximate=gelu)
    return linear(b, h, hidden, c)


# ---------------------------------------------------------------------------
# The families.


def vit(b: GraphBuilder, x="images", c=16, heads=2, patch=4, size=16, classes=10):
    """ViT/DeiT: patch-embed Conv, flatten(2).transpose(1, 2), class token (Expand from
    the batch size, through ConstantOfShape/Equal/Where), position embedding, two
    pre-norm blocks, class token Gather, Gemm head."""
    x = b.conv(x, 3, c, k=patch, strides=[patch, patch])  # [N, c, 4, 4]
    x = b.op("Reshape", [x, b.op("Concat", [dim(b, x, 0), dim(b, x, 1), ints(b, -1)], axis=0)])
    x = b.op("Transpose", [x], perm=[0, 2, 1])  # [N, T, c]
    cls_token = b.const(b.rng.normal(0, 1, (1, 1, c)).astype(np.float32))
    shape = b.op("Concat", [dim(b, x, 0), ints(b, -1, -1)], axis=0)
    ones = b.op("ConstantOfShape", [b.op("Shape", [shape])],
                value=helper.make_tensor("one", TensorProto.INT64, [1], [1]))  # fmt: skip
    shape = b.op("Where", [b.op("Equal", [shape, ints(b, -1)]), ones, shape])
    cls_tokens = b.op("Expand", [cls_token, shape])  # [N, 1, c]
    tokens = (size // patch) ** 2 + 1
    x = b.op("Concat", [cls_tokens, x], axis=1)
    x = b.op("Add", [x, b.const(b.rng.normal(0, 1, (1, tokens, c)).astype(np.float32))])
    for split_form in ("num_outputs", "input"):
        x = b.op("Add", [x, attention(b, layer_norm(b, x, c), c, heads, split_form=split_form)])
        x = b.op("Add", [x, mlp(b, layer_norm(b, x, c), c, 2 * c)])
    x = layer_norm(b, x, c)
    x = b.op("Gather", [x, b.const(np.int64(0))], axis=1)  # the class token, [N, c]
    return b.gemm(x, c, classes)


def roll(b, x, shift, size, axis):
    """torch.roll(x, shift, axis) as exporters write it: two Slices and a Concat, with the
    split point from Mod."""
    point = b.op("Mod", [ints(b, -shift), ints(b, size)])  # Python's sign, fmod=0
    head = b.op("Slice", [x, point, ints(b, size), ints(b, axis)])
    tail = b.op("Slice", [x, ints(b, 0), point, ints(b, axis)])
    return b.op("Concat", [head, tail], axis=axis)


def swin(b: GraphBuilder, x="images", c=8, heads=2, patch=2, window=4, classes=10):
    """Swin: patch embedding to channels-last [N, H, W, c], a window block and a shifted
    window block (roll by Slice/Concat/Mod, window partition and reverse by Reshape and
    Transpose, relative position bias from a Gather, shift mask), mean-pooled head."""
    x = b.conv(x, 3, c, k=patch, strides=[patch, patch])  # [N, c, 8, 8]
    grid = 16 // patch
    x = layer_norm(b, b.op("Transpose", [x], perm=[0, 2, 3, 1]), c, epsilon=1e-5)
    per_side, area = grid // window, window * window
    table = b.const(b.rng.normal(0, 0.5, ((2 * window - 1) ** 2, heads)).astype(np.float32))
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))
    relative = (coords.reshape(2, -1)[:, :, None] - coords.reshape(2, -1)[:, None, :]) + (
        window - 1
    )
    index = b.const((relative[0] * (2 * window - 1) + relative[1]).reshape(-1).astype(np.int64))
    mask = np.where(b.rng.random((per_side**2, area, area)) < 0.3, -100.0, 0.0)
    mask = b.const(mask.astype(np.float32)[None, :, None])  # [1, windows, 1, area, area]

    def bias_and_mask(shifted):
        def add(scores):
            rel = b.op("Gather", [table, index], axis=0)  # [area * area, heads]
            rel = b.op("Reshape", [rel, ints(b, area, area, heads)])
            rel = b.op("Unsqueeze", [b.op("Transpose", [rel], perm=[2, 0, 1]), ints(b, 0)])
            scores = b.op("Add", [scores, rel])
            if not shifted:
                return scores
            per_image = b.op("Reshape", [scores, ints(b, -1, per_side**2, heads, area, area)])
            masked = b.op("Add", [per_image, mask])
            return b.op("Reshape", [masked, ints(b, -1, heads, area, area)])

        return add

    for shifted in (False, True):
        shortcut = x
        h = layer_norm(b, x, c, epsilon=1e-5)
        if shifted:
            h = roll(b, roll(b, h, -(window // 2), grid, 1), -(window // 2), grid, 2)
        partition = ints(b, per_side, window, per_side, window, c)
        h = b.op("Reshape", [h, b.op("Concat", [dim(b, h, 0), partition], axis=0)])
        h = b.op("Transpose", [h], perm=[0, 1, 3, 2, 4, 5])
        h = b.op("Reshape", [h, ints(b, -1, area, c)])  # [N * windows, area, c]
        h = attention(b, h, c, heads, bias_and_mask(shifted))
        h = b.op("Reshape", [h, ints(b, -1, per_side, per_side, window, window, c)])
        h = b.op("Transpose", [h], perm=[0, 1, 3, 2, 4, 5])
        h = b.op("Reshape", [h, ints(b, -1, grid, grid, c)])
        if shifted:
            h = roll(b, roll(b, h, window // 2, grid, 1), window // 2, grid, 2)
        x = b.op("Add", [shortcut, h])
        x = b.op("Add", [x, mlp(b, layer_norm(b, x, c, epsilon=1e-5), c, 2 * c, gelu="tanh")])
    x = b.op("ReduceMean", [layer_norm(b, x, c, epsilon=1e-5), ints(b, 1, 2)], keepdims=0)
    return b.gemm(x, c, classes)


def layer_norm_2d(b, x, c):
    """timm's LayerNorm2d on NCHW: permute to channels-last, LayerNorm, permute back."""
    x = layer_norm(b, b.op("Transpose", [x], perm=[0, 2, 3, 1]), c)
    return b.op("Transpose", [x], perm=[0, 3, 1, 2])


def convnext(b: GraphBuilder, x="images", classes=10):
    """ConvNeXt: patchify stem, blocks of 7x7 depthwise Conv, Transpose to channels-last,
    LayerNorm, MatMul, GELU (the Erf form), MatMul, layer-scale Mul, Transpose back,
    residual Add; a LayerNorm2d and strided Conv between the stages."""
    widths = (8, 16)
    x = layer_norm_2d(b, b.conv(x, 3, widths[0], k=4, strides=[4, 4]), widths[0])  # 8x8
    for stage, c in enumerate(widths):
        if stage:
            x = b.conv(layer_norm_2d(b, x, widths[stage - 1]), widths[stage - 1], c, k=2,
                       strides=[2, 2])  # fmt: skip
        shortcut = x
        h = b.conv(x, c, c, k=7, group=c, pads=[3, 3, 3, 3])
        h = layer_norm(b, b.op("Transpose", [h], perm=[0, 2, 3, 1]), c)
        h = mlp(b, h, c, 4 * c, gelu="erf")
        h = b.op("Mul", [h, b.const(b.rng.uniform(0.5, 1.5, c).astype(np.float32))])
        x = b.op("Add", [shortcut, b.op("Transpose", [h], perm=[0, 3, 1, 2])])
    x = b.op("ReduceMean", [x, ints(b, -2, -1)], keepdims=0)
    return b.gemm(layer_norm(b, x, widths[-1]), widths[-1], classes)


def squeeze_excite(b, x, c, squeezed, gate="HardSigmoid", act="Relu"):
    s = b.op("GlobalAveragePool", [x])
    s = b.conv(s, c, squeezed, k=1)
    s = b.op("Mul", [s, b.op("Sigmoid", [s])]) if act == "SiLU" else b.op(act, [s])
    s = b.op(gate, [b.conv(s, squeezed, c, k=1)])
    return b.op("Mul", [x, s])


def mobilenet_v3(b: GraphBuilder, x="images", classes=10):
    """MobileNetV3: HardSwish stem, an inverted residual with a HardSigmoid
    squeeze-excite, HardSwish classifier."""
    x = b.op("HardSwish", [b.batch_norm(b.conv(x, 3, 8, bias=False, pads=[1, 1, 1, 1],
                                                strides=[2, 2]), 8)])  # fmt: skip  # 8x8
    h = b.op("HardSwish", [b.batch_norm(b.conv(x, 8, 16, k=1, bias=False), 16)])
    h = b.op("HardSwish", [b.batch_norm(b.conv(h, 16, 16, bias=False, group=16,
                                                pads=[1, 1, 1, 1]), 16)])  # fmt: skip
    h = squeeze_excite(b, h, 16, 4)
    x = b.op("Add", [x, b.batch_norm(b.conv(h, 16, 8, k=1, bias=False), 8)])
    x = b.op("HardSwish", [b.conv(x, 8, 24, k=1)])
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x])])
    x = b.op("HardSwish", [b.gemm(x, 24, 32)])
    return b.gemm(x, 32, classes)


def silu(b, x):
    return b.op("Mul", [x, b.op("Sigmoid", [x])])


def efficientnet(b: GraphBuilder, x="images", classes=10):
    """EfficientNet: SiLU (Mul by Sigmoid) everywhere, an MBConv block with a Sigmoid
    squeeze-excite, residual Add."""
    x = silu(b, b.batch_norm(b.conv(x, 3, 8, bias=False, pads=[1, 1, 1, 1]), 8))  # 16x16
    h = silu(b, b.batch_norm(b.conv(x, 8, 24, k=1, bias=False), 24))
    h = silu(b, b.batch_norm(b.conv(h, 24, 24, bias=False, group=24, pads=[1, 1, 1, 1]), 24))
    h = squeeze_excite(b, h, 24, 4, gate="Sigmoid", act="SiLU")
    x = b.op("Add", [x, b.batch_norm(b.conv(h, 24, 8, k=1, bias=False), 8)])
    x = silu(b, b.batch_norm(b.conv(x, 8, 16, k=1, bias=False), 16))
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x])])
    return b.gemm(x, 16, classes)


def regnet(b: GraphBuilder, x="images", classes=10):
    """RegNet/ResNeXt: bottleneck blocks whose 3x3 Conv is grouped (group width 4)."""
    x = b.op("Relu", [b.batch_norm(b.conv(x, 3, 8, bias=False, pads=[1, 1, 1, 1]), 8)])

    def block(x, cin, cout, stride):
        h = b.op("Relu", [b.batch_norm(b.conv(x, cin, cout, k=1, bias=False), cout)])
        h = b.conv(h, cout, cout, bias=False, group=cout // 4, pads=[1, 1, 1, 1],
                   strides=[stride, stride])  # fmt: skip
        h = b.op("Relu", [b.batch_norm(h, cout)])
        h = b.batch_norm(b.conv(h, cout, cout, k=1, bias=False), cout)
        if stride != 1 or cin != cout:
            x = b.batch_norm(b.conv(x, cin, cout, k=1, bias=False, strides=[stride, stride]),
                           cout)  # fmt: skip
        return b.op("Relu", [b.op("Add", [h, x])])

    x = block(block(x, 8, 16, 2), 16, 16, 1)
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x])])
    return b.gemm(x, 16, classes)


def densenet(b: GraphBuilder, x="images", classes=10, growth=4):
    """DenseNet: dense layers (BN, Relu, 1x1 Conv, BN, Relu, 3x3 Conv) concatenated onto
    their input along the channels; a transition (1x1 Conv, AveragePool)."""
    x = b.conv(x, 3, 8, pads=[1, 1, 1, 1])
    c = 8
    for block in range(2):
        for _ in range(2):
            h = b.conv(b.op("Relu", [b.batch_norm(x, c)]), c, 2 * growth, k=1, bias=False)
            h = b.conv(b.op("Relu", [b.batch_norm(h, 2 * growth)]), 2 * growth, growth,
                       bias=False, pads=[1, 1, 1, 1])  # fmt: skip
            x, c = b.op("Concat", [x, h], axis=1), c + growth
        if block == 0:
            x = b.conv(b.op("Relu", [b.batch_norm(x, c)]), c, c // 2, k=1, bias=False)
            x, c = b.op("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2]), c // 2
    x = b.op("Flatten", [b.op("GlobalAveragePool", [b.op("Relu", [b.batch_norm(x, c)])])])
    return b.gemm(x, c, classes)


# name: (build(builder) -> logits, input shape); docs/models.md lists what each needs
FAMILIES = {
    "vit": (vit, ("N", 3, 16, 16)),
    "swin": (swin, ("N", 3, 16, 16)),
    "convnext": (convnext, ("N", 3, 32, 32)),
    "mobilenet_v3": (mobilenet_v3, ("N", 3, 16, 16)),
    "efficientnet": (efficientnet, ("N", 3, 16, 16)),
    "regnet": (regnet, ("N", 3, 16, 16)),
    "densenet": (densenet, ("N", 3, 16, 16)),
}


def family_model(tmp_path, name, seed=0):
    build, shape = FAMILIES[name]
    b = GraphBuilder(seed=seed)
    path = save(b, tmp_path / f"{name}.onnx", build(b), input_shape=shape)
    return path, shape


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_matches_onnxruntime(tmp_path, name):
    path, shape = family_model(tmp_path, name)
    images = images_for(shape, n=5) / 64  # moderate activations: attention not saturated
    model, logits = imported_logits(path, images)
    assert model.image_shape == (*shape[2:], 3) and model.num_classes == 10
    want = onnxruntime_logits(path, images)
    assert np.abs(want).max() > 1e-3
    assert_close(logits, want)
    if name == "vit":  # the class token, Expanded to the batch, is a parameter of its own shape
        (expand,) = [node for node in model.params if node.startswith("Expand")]
        assert model.params[expand]["input"].shape == (1, 1, 16)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_incremental_evaluator_stays_exact_on_the_family(tmp_path, name):
    """`auto` chooses by XLA's FLOP counts; whatever the incremental pass does on the
    graph (windows through the convolutions, the full computation after a token mixer),
    its logits equal the full forward pass's."""
    path, _ = family_model(tmp_path, name)
    model = load_onnx_model(path)
    num_pixels = 1
    chosen = incremental.make_evaluator("auto", model, num_pixels)
    try:
        incremental.program_for(model.apply_fn, model.params, model.image_shape, num_pixels)
    except Exception:  # noqa: BLE001 - untraceable: auto must have fallen back to full
        assert isinstance(chosen, incremental.FullEvaluator)
        print(f"\n{name}: auto=full (not traceable)")
        return
    candidates = placements(model.image_shape, num_pixels, 16)
    image = np.random.default_rng(0).integers(0, 256, model.image_shape) / 4
    assert_matches_full(model, num_pixels, candidates, image=image)
    flops = incremental.flops_per_query(model, num_pixels)
    ratio = flops["full"] / flops["incremental"]
    takes_incremental = ratio >= thresholds.AUTO_MIN_FLOP_RATIO
    assert isinstance(chosen, incremental.IncrementalEvaluator) == takes_incremental
    print(f"\n{name}: auto={chosen.name} flop ratio {ratio:.2f}")


# ---------------------------------------------------------------------------
# One case per operator and form.


def tokens(b, x="images", c=6):
    """[N, 16, c] tokens from a 4x4 patch Conv on 16x16 images, as a ViT makes them."""
    x = b.conv(x, 3, c, k=4, strides=[4, 4])
    return b.op("Transpose", [b.op("Reshape", [x, ints(b, 0, c, -1)])], perm=[0, 2, 1])


def flat(b, x):
    return b.op("Flatten", [x], axis=1)


def scaled(b, x, factor=1 / 64):
    return b.op("Mul", [x, b.const(np.float32(factor))])


def split_case(form, opset):
    def build(b, x):
        x = b.conv(x, 3, 16, k=4, strides=[4, 4])  # [N, 16, 4, 4], stored channels-last
        if form == "attribute":
            parts = b.op("Split", [x], outputs=3, axis=1, split=[4, 8, 4])
        elif form == "input":
            parts = b.op("Split", [x, ints(b, 2, 6, 8)], outputs=3, axis=1)
        elif form == "num_outputs":  # 16 into ceil(16 / 3) = 6, 6 and 4
            parts = b.op("Split", [x], outputs=3, axis=1, num_outputs=3)
        else:  # equal parts along a spatial axis
            parts = b.op("Split", [x], outputs=2, axis=-1)
        reordered = [*parts[:0:-1], b.op("Relu", [parts[0]])]  # last first, the first rectified
        return flat(b, b.op("Concat", reordered, axis=-1 if form == "equal" else 1))

    return build, opset


def scatter_into_tokens(b, x):
    """ScatterND adding a weight to each image's first token: indices (n, 0) from a Range
    over the batch size, updates the weight Expanded to the batch."""
    batch = b.op("Range", [b.const(np.int64(0)), b.op("Gather", [b.op("Shape", [x]),
                                                                 b.const(np.int64(0))]),
                           b.const(np.int64(1))])  # fmt: skip
    first = b.op("Mul", [batch, b.const(np.int64(0))])
    indices = b.op("Concat", [b.op("Unsqueeze", [v, ints(b, 1)]) for v in (batch, first)], axis=1)
    shape = b.op("Concat", [dim(b, x, 0), ints(b, 6)], axis=0)
    updates = b.op("Expand", [b.const(b.rng.normal(0, 1, (1, 6)).astype(np.float32)), shape])
    return flat(b, b.op("ScatterND", [tokens(b), indices, updates], reduction="add"))


def group_norm_by_instance_norm(b, x):
    """nn.GroupNorm(2, 8) as PyTorch exports it before opset 21: Reshape to [N, 2, -1],
    InstanceNormalization, Reshape back, per-channel Mul and Add."""
    y = b.conv(x, 3, 8)
    grouped = b.op("Reshape", [y, ints(b, 0, 2, -1)])
    normed = b.op("InstanceNormalization", [grouped, b.const(np.ones(2, np.float32)),
                                            b.const(np.zeros(2, np.float32))])  # fmt: skip
    y = b.op("Reshape", [normed, b.op("Shape", [y])])
    y = b.op("Mul", [y, b.const(b.rng.uniform(0.5, 1.5, (8, 1, 1)).astype(np.float32))])
    return flat(b, b.op("Add", [y, b.const(b.rng.normal(0, 0.1, (8, 1, 1)).astype(np.float32))]))


# name: (build(builder, x) -> [N, K] output, opset)
OP_CASES = {
    "layer_norm_tokens": (lambda b, x: flat(b, layer_norm(b, tokens(b), 6)), 17),
    "layer_norm_axis_1_no_bias": (lambda b, x: flat(b, b.op("LayerNormalization", [
        b.conv(x, 3, 4), b.const(np.float32(b.rng.uniform(0.5, 1.5, (4, 14, 14))))],
        axis=1, epsilon=1e-3)), 17),
    "gelu_exact": (lambda b, x: flat(b, b.op("Gelu", [scaled(b, b.conv(x, 3, 4))])), 20),
    "gelu_tanh": (lambda b, x: flat(b, b.op("Gelu", [scaled(b, b.conv(x, 3, 4))],
                                           approximate="tanh")), 20),
    "erf": (lambda b, x: flat(b, b.op("Erf", [scaled(b, b.conv(x, 3, 4))])), 17),
    "hard_swish": (lambda b, x: flat(b, b.op("HardSwish", [scaled(b, b.conv(x, 3, 4))])), 17),
    "hard_sigmoid_alpha_beta": (lambda b, x: flat(b, b.op("HardSigmoid", [
        scaled(b, b.conv(x, 3, 4))], alpha=0.3, beta=0.4)), 17),
    "prelu_per_channel_mish_selu": (lambda b, x: flat(b, b.op("Concat", [
        b.op("PRelu", [b.conv(x, 3, 4, k=1), b.const(np.float32([[[0.1]], [[0.2]], [[-0.3]],
                                                                   [[0.5]]]))]),
        b.op("Mish", [scaled(b, b.conv(x, 3, 2, k=1))]),
        b.op("Selu", [scaled(b, b.conv(x, 3, 2, k=1))])], axis=1)), 18),
    "softmax_channels_of_a_map": (lambda b, x: flat(b, b.op("Softmax", [
        scaled(b, b.conv(x, 3, 4))], axis=1)), 17),
    "softmax_middle_axis_of_tokens": (lambda b, x: flat(b, b.op("Softmax", [
        scaled(b, tokens(b))], axis=1)), 17),
    "matmul_map_by_matrix": (lambda b, x: flat(b, b.op("MatMul", [
        b.conv(x, 3, 4), b.weight(14, 5)])), 17),
    "matmul_batched_dynamic_both": (lambda b, x: flat(b, b.op("MatMul", [
        tokens(b), b.op("Transpose", [tokens(b)], perm=[0, 2, 1])])), 17),
    "matmul_broadcast_static_batch": (lambda b, x: flat(b, b.op("MatMul", [
        b.weight(2, 1, 5, 16, scale=0.1), b.op("Unsqueeze", [
            b.op("Unsqueeze", [tokens(b), ints(b, 1)]), ints(b, 1)])])), 17),
    "split_attribute_opset_11": split_case("attribute", 11),
    "split_input_opset_13": split_case("input", 13),
    "split_num_outputs_uneven_opset_18": split_case("num_outputs", 18),
    "split_equal_spatial_axis": split_case("equal", 17),
    "where_greater_expand_constant_of_shape": (lambda b, x: flat(b, b.op("Where", [
        b.op("Greater", [x, b.const(np.float32(128))]),
        b.op("Expand", [b.op("ReduceMax", [x], axes=[2], keepdims=1), ints(b, 1, 1, 16, 1)]),
        b.op("Add", [x, b.op("ConstantOfShape", [b.op("Shape", [x])],
                               value=helper.make_tensor("v", TensorProto.FLOAT, [1], [3.5]))]),
    ])), 17),
    "equal_not_less_on_the_image": (lambda b, x: flat(b, b.op("Where", [
        b.op("Not", [b.op("Less", [b.op("Floor", [scaled(b, x, 1 / 32)]),
                                   b.const(np.float32(4))])]),
        b.op("Neg", [x]), b.op("Where", [b.op("Equal", [b.op("Ceil", [scaled(b, x, 1 / 64)]),
                                                        b.const(np.float32(2))]),
                                         b.const(np.float32(-7)), x])])), 17),
    "mod_fmod_on_the_image": (lambda b, x: flat(b, b.op("Mod", [
        b.op("Sub", [x, b.const(np.float32(128))]), b.const(np.float32(37.5))], fmod=1)), 17),
    "mod_integer_signs_in_a_reshape": (lambda b, x: b.gemm(flat(b, b.op("Reshape", [
        x, b.op("Concat", [
            dim(b, x, 0), b.op("Mod", [ints(b, -5), ints(b, 3)]),  # the divisor's sign: 1
            b.op("Add", [b.op("Mod", [ints(b, -7), ints(b, 3)], fmod=1), ints(b, 2)]),  # -1 + 2
            ints(b, -1)], axis=0)])), 768, 10), 17),
    "einsum_weight_and_batched": (lambda b, x: flat(b, b.op("Einsum", [
        b.op("Einsum", [tokens(b), b.weight(6, 5)], equation="ntc,cd->ntd"),
        tokens(b)], equation="ntd,nsc->ndsc")), 17),
    "elementwise_math": (lambda b, x: flat(b, b.op("Sum", [
        b.op("Sqrt", [b.op("Abs", [b.op("Sub", [x, b.const(np.float32(100))])])]),
        b.op("Exp", [b.op("Neg", [scaled(b, x, 1 / 255)])]),
        b.op("Pow", [scaled(b, x, 1 / 255), b.const(np.float32(2))]),
        b.op("Reciprocal", [b.op("Add", [x, b.const(np.float32(1))])]),
        b.op("Log", [b.op("Add", [x, b.const(np.float32(1))])]),
    ])), 17),
    "max_min_mean_variadic": (lambda b, x: flat(b, b.op("Mean", [
        b.op("Max", [x, b.conv(x, 3, 3, pads=[1, 1, 1, 1]), b.const(np.float32(50))]),
        b.op("Min", [x, b.const(np.float32(200)), b.const(np.full((3, 1, 1), 90, np.float32))]),
        b.conv(x, 3, 3, k=1)])), 17),
    "reductions_over_the_last_axis": (lambda b, x: b.op("Concat", [
        b.op("ReduceSum", [tokens(b), ints(b, -1)], keepdims=0),
        b.op("ReduceMean", [tokens(b)], axes=[-1], keepdims=0),
        b.op("ReduceMax", [tokens(b)], axes=[1], keepdims=0),
        b.op("ReduceMin", [tokens(b)], axes=[1], keepdims=0)], axis=1), 17),
    "shape_arithmetic_range_sqrt_greater": (lambda b, x: flat(b, b.op("Gather", [
        tokens(b), b.op("Cast", [b.op("Mul", [b.op("Range", [
            b.const(np.int64(0)), b.op("Cast", [b.op("Sqrt", [b.op("Cast", [
                b.op("Gather", [b.op("Shape", [tokens(b)]), b.const(np.int64(1))]),
            ], to=1)])], to=7), b.const(np.int64(1))]),
            b.op("Cast", [b.op("Greater", [ints(b, 5), ints(b, 4)]), ], to=7)])], to=7)],
        axis=1)), 17),
    "tokens_back_to_a_map": (lambda b, x: flat(b, b.conv(b.op("Reshape", [
        b.op("Transpose", [layer_norm(b, tokens(b), 6)], perm=[0, 2, 1]), ints(b, 0, 6, 4, 4)]),
        6, 4, pads=[1, 1, 1, 1])), 17),
    "concat_and_add_on_flattened_maps": (lambda b, x: flat(b, b.op("Transpose", [b.op("Add", [
        b.op("Concat", [b.op("Reshape", [b.conv(x, 3, 4), ints(b, 0, 4, -1)]),
                        b.op("Reshape", [b.conv(x, 3, 4), ints(b, 0, 4, -1)])], axis=2),
        b.const(np.float32(b.rng.normal(0, 1, (4, 1))))])], perm=[0, 2, 1])), 17),
    "scatter_nd_mask_by_slice_assignment": (lambda b, x: flat(b, b.op("Add", [
        b.op("MaxPool", [x], kernel_shape=[4, 4], strides=[4, 4]),
        b.op("ScatterND", [b.op("ConstantOfShape", [ints(b, 4, 4)]), b.const(np.int64(
            [[0, 0], [1, 2], [3, 3]])), b.const(np.float32([1.0, -2.0, 3.0]))])])), 17),
    "scatter_nd_into_tokens_add": (scatter_into_tokens, 18),
    "reduce_l2_l1_sum_square": (lambda b, x: b.op("Concat", [
        b.op("ReduceL2", [tokens(b)], axes=[-1], keepdims=0),
        b.op("ReduceL1", [tokens(b)], axes=[1], keepdims=0),
        b.op("ReduceSumSquare", [scaled(b, tokens(b))], axes=[2], keepdims=0)], axis=1), 17),
    "fill_of_the_batch_size": (lambda b, x: flat(b, b.op("Mul", [x, b.op("ConstantOfShape", [
        b.op("Shape", [x])], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5]))])),
        17),
    "instance_norm_on_a_map": (lambda b, x: flat(b, b.op("InstanceNormalization", [
        b.conv(x, 3, 4), b.const(np.float32([0.5, 1.0, 1.5, 2.0])),
        b.const(np.float32([0.1, -0.2, 0.3, 0.0]))], epsilon=1e-3)), 17),
    "group_norm_as_pytorch_writes_it": (group_norm_by_instance_norm, 17),
    "group_norm_operator_opset_21": (lambda b, x: flat(b, b.op("GroupNormalization", [
        b.conv(x, 3, 8), b.const(np.float32(b.rng.uniform(0.5, 1.5, 8))),
        b.const(np.float32(b.rng.normal(0, 0.1, 8)))], num_groups=2, epsilon=1e-4)), 21),
    "reduce_mean_of_a_flattened_map": (lambda b, x: b.op("ReduceMean", [
        b.op("Reshape", [b.conv(x, 3, 4), ints(b, 0, 4, -1)])], axes=[2], keepdims=0), 17),
    "gather_nd_of_a_table_and_per_image": (lambda b, x: flat(b, b.op("GatherND", [
        b.op("Add", [tokens(b), b.op("GatherND", [
            b.const(b.rng.normal(0, 1, (5, 4, 6)).astype(np.float32)),
            b.const(b.rng.integers(-4, 4, (16, 2)))])]),
        b.op("Expand", [b.const(np.int64([[[3], [0], [-1]]])), b.op("Concat", [
            dim(b, x, 0), ints(b, 3, 1)], axis=0)])], batch_dims=1)), 17),
    "tile": (lambda b, x: flat(b, b.op("Add", [
        b.op("Tile", [b.const(np.float32(b.rng.normal(0, 1, (1, 3, 1, 8)))),
                      ints(b, 1, 1, 16, 2)]),
        x])), 17),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_operator_matches_onnxruntime(tmp_path, case):
    build, opset = OP_CASES[case]
    b = GraphBuilder(seed=5)
    path = save(b, tmp_path / f"{case}.onnx", build(b, "images"), opset=opset)
    images = images_for(("N", 3, 16, 16), n=5)  # not a batch size the load traces
    _, logits = imported_logits(path, images)
    assert_close(logits, onnxruntime_logits(path, images))


def test_token_layouts_move_no_data(tmp_path):
    """flatten(2).transpose(1, 2) of a channels-last map, and the way back, are reshapes
    of the stored data: the traced graph holds no transpose."""
    b = GraphBuilder(seed=6)
    x = b.op("Transpose", [layer_norm(b, tokens(b), 6)], perm=[0, 2, 1])
    x = b.conv(b.op("Reshape", [x, ints(b, 0, 6, 4, 4)]), 6, 4, pads=[1, 1, 1, 1])
    output = b.gemm(flat(b, b.op("GlobalAveragePool", [x])), 4, 10)
    path = save(b, tmp_path / "tokens.onnx", output, opset=17)
    images = images_for(("N", 3, 16, 16))
    _, logits = imported_logits(path, images)
    assert_close(logits, onnxruntime_logits(path, images))
    model = load_onnx_model(path)
    jaxpr = jax.make_jaxpr(model.apply_fn)(model.params, images)
    primitives = [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]
    assert "transpose" not in primitives, primitives


# ---------------------------------------------------------------------------
# Channel counts.


@pytest.mark.parametrize("nchw", [True, False])
def test_grayscale_graph_loads_with_one_channel(tmp_path, nchw):
    b = GraphBuilder(seed=12)
    x = "images" if nchw else b.op("Transpose", ["images"], perm=[0, 3, 1, 2])
    x = b.op("MaxPool", [b.op("Relu", [b.conv(x, 1, 4, pads=[1, 1, 1, 1])])],
             kernel_shape=[2, 2], strides=[2, 2])  # fmt: skip
    output = b.gemm(flat(b, x), 4 * 14 * 14, 10)
    shape = ("N", 1, 28, 28) if nchw else ("N", 28, 28, 1)
    path = save(b, tmp_path / "gray.onnx", output, input_shape=shape, opset=17)
    images = np.random.default_rng(3).uniform(0, 255, (3, 28, 28, 1)).astype(np.float32)
    model, logits = imported_logits(path, images)
    assert model.image_shape == (28, 28, 1)
    assert model.meta["input"]["layout"] == ("NCHW" if nchw else "NHWC")
    assert_close(logits, onnxruntime_logits(path, images, nchw=nchw))
    # a per-channel RGB convention cannot apply to one channel; one value for all can
    from opa_jax.models import convention

    with pytest.raises(InputError, match=r"gray\.onnx.*1-channel images"):
        load_onnx_model(path, input_convention=convention.named("imagenet"))
    mnist = convention.InputConvention(scale=1 / 255, mean=(0.1307,), std=(0.3081,))
    model = load_onnx_model(path, input_convention=mnist)
    normalised = (images / np.float32(255) - np.float32(0.1307)) / np.float32(0.3081)
    want = onnxruntime_logits(path, normalised.astype(np.float32), nchw=nchw)
    assert_close(np.asarray(model.apply_fn(model.params, images)), want)


def test_unsupported_operators_are_still_named(tmp_path):
    b = GraphBuilder()
    x = b.op("GridSample", [b.conv("images", 3, 4), b.const(np.zeros((1, 2, 2, 2), np.float32))])
    path = save(b, tmp_path / "grid.onnx", flat(b, x), opset=17)
    with pytest.raises(InputError, match=r"'GridSample_2' \(GridSample\).*supported: .*Einsum"):
        load_onnx_model(path)
