"""The zoo's architectures: parameter counts against the papers, shapes, inference mode."""

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

from opa_jax.errors import InputError
from opa_jax.models import base, load_model, zoo
from opa_jax.models.layers import ceil_mode_padding


def conv(kernel, fan_in, features, bias=False):
    return kernel * kernel * fan_in * features + (features if bias else 0)


def dense(fan_in, features):
    return fan_in * features + features


# Expected counts from the papers' layer tables. With batch norm a hidden conv has
# no bias and its BN adds a scale and an offset per channel (2 * features).
def nin_counts():
    hidden = [(5, 3, 192), (1, 192, 160), (1, 160, 96), (5, 96, 192), (1, 192, 192),
              (1, 192, 192), (3, 192, 192), (1, 192, 192)]  # fmt: skip
    weights = sum(conv(*layer) for layer in hidden) + conv(1, 192, 10, bias=True)
    bn = sum(2 * layer[2] for layer in hidden)
    return weights + bn, bn


def allconv_counts():
    hidden = [(3, 3, 96), (3, 96, 96), (3, 96, 96), (3, 96, 192), (3, 192, 192),
              (3, 192, 192), (3, 192, 192), (1, 192, 192)]  # fmt: skip
    weights = sum(conv(*layer) for layer in hidden) + conv(1, 192, 10, bias=True)
    bn = sum(2 * layer[2] for layer in hidden)
    return weights + bn, bn


def vgg16_counts():
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    fan_ins = [3] + widths[:-1]
    convs = sum(conv(3, c_in, c_out) for c_in, c_out in zip(fan_ins, widths, strict=True))
    bn = 2 * sum(widths)
    # 32x32 after five 2x2 pools is 1x1x512.
    fcs = dense(512, 2048) + dense(2048, 2048) + dense(2048, 10)
    return convs + bn + fcs, bn


def alexnet_counts():
    convs = (conv(11, 3, 96, True) + conv(5, 48, 256, True) + conv(3, 256, 384, True)
             + conv(3, 192, 384, True) + conv(3, 192, 256, True))  # fmt: skip
    fcs = dense(6 * 6 * 256, 4096) + dense(4096, 4096) + dense(4096, 1000)
    return convs + fcs, 0


EXPECTED = {
    "nin": (nin_counts(), 968_394),
    "allconv": (allconv_counts(), 1_370_986),
    "vgg16": (vgg16_counts(), 19_986_378),
    "alexnet": (alexnet_counts(), 60_965_224),  # the published 61M of Krizhevsky et al.
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parameter_counts_match_the_paper_architectures(name):
    (params, bn_params), documented = EXPECTED[name]
    assert params == documented  # the figure in docs/models.md
    arch = zoo.ARCHITECTURES[name]
    shapes = base.variable_shapes(zoo.build(name), arch.image_shape)
    assert base.count_params(shapes) == params
    stats = jax.tree_util.tree_leaves(shapes.get("batch_stats", {}))
    assert (
        sum(x.size for x in stats) == bn_params
    )  # a running mean and variance per BN scale/offset


def test_batch_norm_off_restores_conv_biases():
    shapes = base.variable_shapes(zoo.build("nin", batch_norm=False), (32, 32, 3))
    assert "batch_stats" not in shapes
    params = shapes["params"]
    assert params["conv1"]["bias"].shape == (192,)
    assert base.count_params(shapes) == 966_986  # the Caffe cifar10 NiN


def test_kernels_start_from_he_without_batch_norm_and_from_lecun_with_it():
    # He (variance 2 / fan-in) keeps a ReLU stack's scale; LeCun (1 / fan-in) is flax's.
    for batch_norm, gain in ((False, 2.0), (True, 1.0)):
        module = zoo.build("nin", batch_norm=batch_norm, width=0.25)
        params = base.init_variables(module, jax.random.key(0), (32, 32, 3))["params"]
        kernel = np.asarray(params["cccp3"]["kernel"])  # 1x1, 48 -> 48: 2,304 weights
        fan_in = int(np.prod(kernel.shape[:-1]))
        assert np.std(kernel) == pytest.approx(math.sqrt(gain / fan_in), rel=0.1)


def random_variables(shapes, seed=0):
    """Variables of the given shapes without compiling `init` (slow on the CPU)."""
    rng = np.random.default_rng(seed)

    def draw(leaf):
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
        values = rng.normal(0.0, 1.0 / np.sqrt(fan_in), leaf.shape)
        if len(leaf.shape) == 1:  # biases, BN scales/offsets/statistics: positive, non-trivial
            values = rng.uniform(0.5, 1.5, leaf.shape)
        return jnp.asarray(values, leaf.dtype)

    return jax.tree_util.tree_map(draw, shapes)


@pytest.mark.parametrize("name", ["nin", "allconv", "vgg16"])
def test_cifar_models_map_images_to_logits_per_image(name):
    # A narrow version keeps the test fast; widths do not change the layer structure.
    module = zoo.build(name, width=0.125, num_classes=7)
    variables = random_variables(base.variable_shapes(module, (32, 32, 3)))
    apply_fn = base.make_apply_fn(module)
    images = jax.random.uniform(jax.random.key(2), (4, 32, 32, 3), minval=0, maxval=255)
    logits = apply_fn(variables, images)
    assert logits.shape == (4, 7) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    # Inference mode: an image's logits do not depend on the rest of the batch (running
    # batch-norm statistics, no dropout).
    other = images.at[1:].set(images[1:][::-1] * 0.5)
    np.testing.assert_allclose(apply_fn(variables, other)[0], logits[0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits[0], logits[1])


def test_random_model_is_seed_zero_and_jittable_inside_another_jit():
    model = load_model("random:nin")
    expected = base.init_variables(zoo.build("nin"), jax.random.key(0), (32, 32, 3))
    leaves = jax.tree_util.tree_leaves(model.params)
    for a, b in zip(leaves, jax.tree_util.tree_leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)
    assert model.image_shape == (32, 32, 3) and model.num_classes == 10
    assert model.class_names[0] == "airplane"
    images = jax.random.uniform(jax.random.key(1), (3, 32, 32, 3), minval=0, maxval=255)
    direct = model.apply_fn(model.params, images)
    nested = jax.jit(lambda params, x: model.apply_fn(params, x) * 1.0)(model.params, images)
    np.testing.assert_allclose(nested, direct, rtol=1e-5, atol=1e-6)
    assert float(jnp.std(direct)) > 0  # random weights give varied logits


def test_unknown_model_names_the_known_ones():
    for call in (lambda: zoo.build("resnet50"), lambda: load_model("random:resnet50")):
        with pytest.raises(InputError) as error:
            call()
        for known in ("nin", "allconv", "vgg16", "alexnet"):
            assert known in str(error.value)


def test_unknown_option_is_an_input_error():
    with pytest.raises(InputError, match="depth"):
        zoo.build("nin", depth=3)


@pytest.mark.parametrize(
    "size, kernel, stride, caffe_out",
    [(32, 3, 2, 16), (16, 3, 2, 8), (55, 3, 2, 27), (27, 3, 2, 13), (13, 3, 2, 6), (8, 2, 2, 4)],
)
def test_ceil_mode_padding_gives_caffe_output_sizes(size, kernel, stride, caffe_out):
    assert math.ceil((size - kernel) / stride) + 1 == caffe_out
    ((low, high),) = ceil_mode_padding((size,), kernel, stride)
    assert low == 0
    assert (size + high - kernel) // stride + 1 == caffe_out  # a VALID pool on the padded input


def _convolution_operand_dtypes(jaxpr) -> set[str]:
    """The operand dtypes of every convolution and matrix product, nested calls included."""
    dtypes = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
            dtypes |= {str(v.aval.dtype) for v in eqn.invars}
        for sub in jax_core.jaxprs_in_params(eqn.params):
            dtypes |= _convolution_operand_dtypes(sub)
    return dtypes


@pytest.mark.parametrize("name", ["nin", "vgg16"])
def test_bfloat16_precision_computes_zoo_models_in_bfloat16(name, tmp_path):
    # A module whose dtype is float32 casts bfloat16 weights and inputs back to float32:
    # the zoo's modules, from a checkpoint too, are rebuilt with bfloat16 compute.
    module = zoo.build(name, width=0.0625)
    variables = base.init_variables(module, jax.random.key(0), (32, 32, 3))
    model = base.LoadedModel(f"tiny-{name}", base.make_apply_fn(module), variables,
                             (32, 32, 3), 10, module=module)  # fmt: skip
    model16 = model.with_precision("bfloat16")
    images = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)), jnp.float32)
    jaxpr = jax.make_jaxpr(model16.apply_fn)(model16.params, images).jaxpr
    assert _convolution_operand_dtypes(jaxpr) == {"bfloat16"}
    plain = jax.make_jaxpr(model.apply_fn)(model.params, images).jaxpr
    assert _convolution_operand_dtypes(plain) == {"float32"}
    logits, logits16 = (
        model.apply_fn(model.params, images),
        model16.apply_fn(model16.params, images),
    )
    assert logits16.dtype == jnp.float32
    np.testing.assert_allclose(logits16, logits, rtol=0, atol=0.05 * float(jnp.abs(logits).max()))
    # A random model and a checkpoint keep their module for it.
    assert load_model(f"random:{name}").module is not None
    shipped = pathlib.Path(__file__).resolve().parents[1] / "checkpoints" / "cifar10" / name
    assert load_model(f"ckpt:{shipped}").module is not None
