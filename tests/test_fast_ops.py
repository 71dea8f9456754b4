"""layers.fast_conv and fast_max_pool: the values and gradients of the plain lax
operations, by other routes (issue 15).

Gradients are compared with `jax.grad` of `lax.conv_general_dilated` and
`nn.max_pool` in float64 (where both routes agree to rounding, so a wrong term
shows), and in float32 and bfloat16 at those types' precision.
"""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from opa_jax import train_speed
from opa_jax.errors import InputError
from opa_jax.models import base, layers, zoo

TOLERANCES = {"float64": 1e-12, "float32": 2e-5, "bfloat16": 3e-2}  # relative to the largest value


def plain_conv(images, kernel, strides, padding):
    return lax.conv_general_dilated(
        images, kernel, strides, padding, dimension_numbers=layers.NHWC_DIMENSIONS
    )


def assert_close(actual, expected, dtype):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(np.abs(expected).max(), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOLERANCES[dtype] * scale)


def values_and_grads(fn, *args):
    """fn(*args) and the gradients of a random projection of it (every output counts)."""
    out = fn(*args)
    weights = jax.random.normal(jax.random.key(9), out.shape, jnp.float32).astype(out.dtype)
    loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * weights.astype(jnp.float32))
    return out, jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)


CONV_CASES = [
    # (batch, size, channels, features, kernel, stride, padding)
    (2, 9, 3, 5, 5, 1, ((2, 2), (2, 2))),  # few channels: whole-window im2col
    (2, 8, 40, 6, 3, 1, ((1, 1), (1, 1))),  # many channels: one product per kernel row
    (3, 9, 30, 4, 3, 2, ((1, 1), (1, 1))),  # stride 2 (All-CNN-C's conv3, conv6)
    (2, 9, 30, 4, 3, 2, ((0, 1), (1, 0))),  # asymmetric padding
    (2, 8, 4, 3, 3, 1, ((0, 0), (0, 0))),  # valid
    (2, 7, 5, 4, 1, 1, ((0, 0), (0, 0))),  # 1x1: matrix products
    (2, 8, 5, 3, 1, 2, ((0, 0), (0, 0))),  # strided 1x1
    (2, 6, 3, 4, 2, 2, ((0, 1), (0, 1))),  # even kernel, ceil-mode style padding
    (2, 2, 24, 6, 3, 1, ((1, 1), (1, 1))),  # smaller than the kernel (VGG's 2x2 convs)
    (2, 1, 24, 6, 3, 1, ((1, 1), (1, 1))),  # and 1x1
    (2, 2, 5, 4, 3, 2, ((1, 1), (1, 1))),
    (2, 4, 24, 6, 3, 1, ((1, 1), (1, 1))),  # mostly padding: one product per valid tap
    (2, 3, 5, 4, 5, 1, ((2, 1), (0, 3))),  # the same, asymmetric; some taps read nothing
]


# float64 on every case; the low-precision types on the four routes (whole-window
# im2col, a product per kernel row, a map smaller than the kernel, valid taps).
CONV_DTYPE_CASES = [(case, "float64") for case in CONV_CASES] + [
    (CONV_CASES[0], "float32"),
    (CONV_CASES[1], "bfloat16"),
    (CONV_CASES[8], "float32"),
    (CONV_CASES[11], "bfloat16"),
]


def test_valid_taps_route_is_taken_where_most_pairs_read_padding():
    share = lambda size, kernel, stride=1, pad=1: layers._padding_share(
        (1, size, size, 1), (kernel, kernel, 1, 1), (stride, stride), ((pad, pad), (pad, pad))
    )
    # VGG16's 3x3 'SAME' convolutions: 32x32 to 8x8 keep the convolution, 4x4 and 2x2 do not.
    assert share(8, 3) == pytest.approx(1 - (22 / 24) ** 2)
    assert share(4, 3) == pytest.approx(1 - (10 / 12) ** 2)
    assert share(2, 3) == pytest.approx(1 - (4 / 6) ** 2)
    threshold = layers.VALID_TAPS_MIN_PADDING_SHARE
    assert share(32, 3) < share(8, 3) < threshold < share(4, 3) < share(2, 3)
    assert share(1, 3) == pytest.approx(1 - 1 / 9)  # only the centre tap reads the image
    assert share(4, 3, stride=2) == 0.0 and share(4, 3, pad=0) == 0.0  # strided; VALID
    # The route's program has matrix products, not convolutions, and no custom VJP.
    images, kernel = jnp.ones((2, 4, 4, 3)), jnp.ones((3, 3, 3, 5))
    conv = functools.partial(layers.fast_conv, padding=((1, 1), (1, 1)))
    names = {e.primitive.name for e in jax.make_jaxpr(conv)(images, kernel).eqns}
    assert "dot_general" in names and "conv_general_dilated" not in names
    assert not any("custom" in name for name in names)
    out = conv(images, kernel)
    edge, inner = [12, 18, 18, 12], [18, 27, 27, 18]  # 4, 6 or 9 taps read the image, x3
    np.testing.assert_allclose(out[0, :, :, 0], [edge, inner, inner, edge])


@pytest.mark.parametrize(
    "case, dtype",
    CONV_DTYPE_CASES,
    ids=lambda c: "x".join(map(str, c[:6])) if isinstance(c, tuple) else c,
)
def test_conv_matches_lax_values_and_gradients(case, dtype):
    batch, size, channels, features, kernel_size, stride, padding = case
    with jax.enable_x64(dtype == "float64"):
        key_images, key_kernel = jax.random.split(jax.random.key(0))
        images = jax.random.normal(key_images, (batch, size, size, channels)).astype(dtype)
        kernel = jax.random.normal(key_kernel, (kernel_size, kernel_size, channels, features))
        kernel = kernel.astype(dtype)
        strides = (stride, stride)
        fast = functools.partial(layers.fast_conv, strides=strides, padding=padding)
        plain = functools.partial(plain_conv, strides=strides, padding=padding)
        out, (grad_images, grad_kernel) = values_and_grads(fast, images, kernel)
        expected, (expected_images, expected_kernel) = values_and_grads(plain, images, kernel)
        assert out.dtype == expected.dtype and out.shape == expected.shape
        assert grad_kernel.dtype == kernel.dtype and grad_images.dtype == images.dtype
        assert_close(out, expected, dtype)
        assert_close(grad_images, expected_images, dtype)
        assert_close(grad_kernel, expected_kernel, dtype)


def test_conv_general_dilated_is_a_drop_in_for_lax():
    images = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 4, 6))
    dims = ("NHWC", "HWIO", "NHWC")
    for padding in ("SAME", "VALID", [(1, 0), (0, 1)]):
        fast = layers.conv_general_dilated(images, kernel, (2, 2), padding, dimension_numbers=dims)
        plain = lax.conv_general_dilated(images, kernel, (2, 2), padding, dimension_numbers=dims)
        np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=1e-5)
    # Calls outside fast_conv's case (dilation, groups) are lax's own.
    dilated = layers.conv_general_dilated(
        images, kernel, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=dims
    )
    expected = lax.conv_general_dilated(
        images, kernel, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=dims
    )
    np.testing.assert_array_equal(dilated, expected)
    grouped = layers.conv_general_dilated(
        images, kernel[:, :, :2], (1, 1), "SAME", dimension_numbers=dims, feature_group_count=2
    )
    assert grouped.shape == (2, 8, 8, 6)


POOL_CASES = [
    # (size, window, stride, padding); None = Caffe's ceil-mode padding
    (32, 3, 2, None),  # NiN's pool: 32 -> 16, one extra window clipped at the border
    (9, 3, 2, None),
    (16, 2, 2, "VALID"),  # VGG's pools
    (7, 2, 2, "VALID"),  # the last row and column are dropped
    (8, 3, 1, "SAME"),  # padding on both sides
    (6, 3, 3, ((1, 1), (0, 2))),
]


POOL_DTYPE_CASES = [(case, "float64") for case in POOL_CASES] + [
    (POOL_CASES[i], dtype) for i in (0, 2) for dtype in ("float32", "bfloat16")
]


@pytest.mark.parametrize(
    "case, dtype",
    POOL_DTYPE_CASES,
    ids=lambda c: "x".join(map(str, c[:3])) if isinstance(c, tuple) else c,
)
def test_max_pool_matches_flax_values_and_gradients(case, dtype):
    size, window, stride, padding = case
    if padding is None:
        padding = layers.ceil_mode_padding((size, size), window, stride)
    with jax.enable_x64(dtype == "float64"):
        images = jax.random.normal(jax.random.key(0), (2, size, size, 3)).astype(dtype)
        # Ties: after a ReLU, whole windows are 0; rounding also makes equal values.
        images = jnp.maximum(jnp.round(images * 2) / 2, 0)
        pool = functools.partial(
            layers.fast_max_pool, window=(window, window), strides=(stride, stride), padding=padding
        )
        plain = functools.partial(
            nn.max_pool, window_shape=(window, window), strides=(stride, stride), padding=padding
        )
        out, (grad,) = values_and_grads(pool, images)
        expected, (expected_grad,) = values_and_grads(plain, images)
        np.testing.assert_array_equal(out, expected)
        assert grad.dtype == images.dtype
        # The cotangent of each window goes to its first maximum, as select_and_scatter
        # sends it: with ties everywhere, any other choice moves whole cotangents.
        assert_close(grad, expected_grad, dtype)


def test_max_pool_routes_each_window_to_its_first_maximum():
    images = jnp.zeros((1, 4, 4, 1)).at[0, 1, 1, 0].set(1.0)  # ties of 0 elsewhere
    grad = jax.grad(
        lambda x: jnp.sum(
            layers.fast_max_pool(x, (2, 2), (2, 2)) * jnp.arange(1.0, 5.0).reshape(1, 2, 2, 1)
        )
    )(images)
    expected = np.zeros((4, 4))
    expected[1, 1] = 1.0  # the one maximum of window (0, 0)
    expected[0, 2], expected[2, 0], expected[2, 2] = 2.0, 3.0, 4.0  # the first of four zeros
    np.testing.assert_array_equal(grad[0, :, :, 0], expected)


def loss_and_grads(module, variables, images, labels):
    def loss_fn(params):
        logits, updates = module.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            images,
            train=True,
            rngs={"dropout": jax.random.key(1)},
            mutable=["batch_stats"],
        )
        loss = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels])
        return loss, (logits, updates["batch_stats"])

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])


@pytest.mark.slow
# NiN (ceil-mode pools, 1x1 convolutions as products) and VGG16 (maps smaller than the
# kernel); All-CNN-C's strided convolutions are cases of the operator test above.
@pytest.mark.parametrize("name, width", [("nin", 0.0625), ("vgg16", 0.03125)])
def test_zoo_models_match_the_plain_operations(name, width):
    """Through `module.apply(..., train=True)`: the same logits, batch statistics and
    parameter gradients as the plain operations; and the same inference logits (what
    checkpoints and attacks see). In float64, so that any wrong term shows."""
    with jax.enable_x64(True):
        fast_module = zoo.build(name, width=width, dtype=jnp.float64)
        plain_module = zoo.build(name, width=width, dtype=jnp.float64, fast_gradients=False)
        variables = base.init_variables(plain_module, jax.random.key(0), (32, 32, 3))
        variables = jax.tree.map(lambda v: v.astype(jnp.float64), variables)
        images = jax.random.uniform(jax.random.key(2), (4, 32, 32, 3), jnp.float64, 0, 255)
        labels = jnp.arange(4) % 10
        (loss, (logits, stats)), grads = loss_and_grads(fast_module, variables, images, labels)
        (loss0, (logits0, stats0)), grads0 = loss_and_grads(plain_module, variables, images, labels)
        np.testing.assert_allclose(loss, loss0, rtol=1e-12)
        np.testing.assert_allclose(logits, logits0, rtol=1e-10, atol=1e-10)
        for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats0), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
        leaves = jax.tree_util.tree_leaves_with_path(grads)
        assert len(leaves) == len(jax.tree.leaves(grads0))
        for (path, a), b in zip(leaves, jax.tree.leaves(grads0), strict=True):
            scale = np.abs(b).max()
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-9 * scale, err_msg=str(path))
        inference = base.make_apply_fn(fast_module)(variables, images)
        expected = base.make_apply_fn(plain_module)(variables, images)
        np.testing.assert_allclose(inference, expected, rtol=1e-10, atol=1e-10)


def primitives(jaxpr) -> list:
    """Every equation of a jaxpr and of the jaxprs nested in it."""
    found = []
    for eqn in jaxpr.eqns:
        found.append(eqn)
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                found.extend(primitives(inner))
    return found


def batch_contracting_convs(module, variables, images, labels) -> list:
    """The convolutions of a train step's gradient that contract over the batch (XLA's
    kernel gradients: the batch is their feature axis)."""
    jaxpr = jax.make_jaxpr(lambda v: loss_and_grads(module, v, images, labels))(variables)
    convs = [e for e in primitives(jaxpr.jaxpr) if e.primitive.name == "conv_general_dilated"]
    assert convs
    return [e for e in convs if e.params["dimension_numbers"].lhs_spec[0] != 0]


@pytest.mark.parametrize("name", ["nin", "allconv", "vgg16"])
def test_zoo_gradients_avoid_the_slow_cpu_operations(name):
    """The train step's gradient holds no select_and_scatter (max pooling's plain
    gradient) and no convolution over the batch: kernel gradients are matrix products."""
    module = zoo.build(name, width=0.0625)
    plain = zoo.build(name, width=0.0625, fast_gradients=False)
    variables = base.variable_shapes(module, (32, 32, 3))  # tracing needs no values
    images, labels = jnp.zeros((2, 32, 32, 3)), jnp.zeros(2, jnp.int32)
    jaxpr = jax.make_jaxpr(lambda v: loss_and_grads(module, v, images, labels))(variables)
    assert "select_and_scatter_add" not in {e.primitive.name for e in primitives(jaxpr.jaxpr)}
    assert batch_contracting_convs(module, variables, images, labels) == []
    assert len(batch_contracting_convs(plain, variables, images, labels)) >= 5


@pytest.mark.slow
def test_train_speed_rows_and_table():
    """The benchmark's arithmetic on a real (tiny) measurement: per-image seconds, ratios
    to the forward pass of the same operations, hours per epoch and the table."""
    rows = train_speed.measure("nin", batch_size=4, device_counts=(1,), rounds=1, width=0.0625,
                               log=lambda message: None)  # fmt: skip
    (row,) = rows
    assert row["model"] == "nin" and row["devices"] == 1
    for ops in ("plain", "fast"):
        forward, step = row[f"{ops}_forward_s_per_image"], row[f"{ops}_step_s_per_image"]
        assert 0 < forward and 0 < step
        assert row[f"{ops}_ratio"] == pytest.approx(step / forward)
        assert row[f"{ops}_hours_per_epoch"] == pytest.approx(step * 50_000 / 3600)
        assert min(row[f"{ops}_seconds"]["step"]) / 4 == pytest.approx(step)
    table = train_speed.markdown(rows)
    assert table.count("\n") == 3 and table.splitlines()[2].startswith("| nin | 1 | ")


def test_train_speed_by_size_rows_and_table():
    """Progressive resizing's price list on a real (tiny) measurement: a row for the
    native size and each requested one, speed-ups relative to the native step."""
    rows = train_speed.measure_sizes("nin", (16, 24), batch_size=4, rounds=1, width=0.0625,
                                     log=lambda message: None)  # fmt: skip
    assert [(r["height"], r["width"]) for r in rows] == [(32, 32), (16, 16), (24, 24)]
    assert rows[0]["speedup"] == 1.0 and rows[1]["pixel_share"] == 0.25
    for row in rows:
        assert row["images_per_s"] == pytest.approx(4 / min(row["seconds"]))
        assert row["speedup"] == pytest.approx(min(rows[0]["seconds"]) / min(row["seconds"]))
    table = train_speed.sizes_markdown(rows)
    assert table.count("\n") == 5 and table.splitlines()[3].startswith("| nin | 16x16 | ")
    assert table.splitlines()[3].endswith("| 4.00x |")


def test_train_speed_refuses_sizes_a_model_cannot_take(tmp_path, monkeypatch):
    import importlib

    monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    config = importlib.import_module("configs.benchmark_train").get_config()
    config.models, config.device_counts, config.train_sizes = ("nin",), (1,), (16, 32)
    expected = r"config.train_sizes=\(16, 32\): expected heights from 1 to 31, below nin's"
    with pytest.raises(InputError, match=expected):
        train_speed.benchmark(config, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
