"""Each rule of the incremental pass against the full computation, one row per rule.

A row is a small layer on a tiny image whose equations of one primitive go
through the rule under test. The test checks the layer's output for pixels at
the corners (overlapping windows when k > 1) and at random places against the
full forward pass of the perturbed image, and asserts the form each of those
equations took (`Form`). Every primitive in the rule table has a row.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from opa_jax import de, incremental
from opa_jax.incremental.program import Form
from opa_jax.incremental.rules import ELEMENTWISE, RULES

W, WD, FD, F = Form.WINDOW, Form.WINDOW_DELTA, Form.FULL_DELTA, Form.FULL
TOLERANCE = 1e-5  # x the largest |output|


@dataclasses.dataclass(frozen=True)
class Row:
    primitive: str
    layer: Callable  # [1, H, W, C] -> any map
    forms: Form | tuple[Form, ...]  # the form of each of the layer's `primitive` equations
    num_pixels: int = 1
    shape: tuple[int, int, int] = (8, 9, 3)
    name: str = ""

    @property
    def id(self) -> str:
        forms = self.forms if isinstance(self.forms, tuple) else (self.forms,)
        suffix = f"-{self.name}" if self.name else ""
        return f"{self.primitive}-{'+'.join(forms)}-k{self.num_pixels}{suffix}"


def constant(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def conv(x, kernel, features=4, stride=1, padding="SAME", dilation=1, groups=1):
    weights = constant((*kernel, x.shape[-1] // groups, features), seed=sum(kernel) + features)
    return lax.conv_general_dilated(
        x,
        weights,
        (stride, stride),
        padding,
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


def pool(x, init, reducer, window, stride, padding="VALID"):
    return lax.reduce_window(
        x, init, reducer, (1, window, window, 1), (1, stride, stride, 1), padding
    )


def two_convs(x):
    """A 2x2 window (the first conv), then a 5x5 kernel over it."""
    return conv(conv(x, (2, 2), padding="VALID"), (5, 5))


ROWS = [
    # Elementwise.
    Row("add", lambda x: x + constant(x.shape[1:]), W, name="static-map"),
    Row("add", lambda x: x + conv(x, (3, 3), features=3), W, name="two-windows"),
    Row("mul", lambda x: x * constant(x.shape[-1:]), W),
    Row("max", lambda x: jnp.maximum(x, 0.0), W),
    Row("tanh", jnp.tanh, W),
    Row("integer_pow", lambda x: x**3, W),
    Row("select_n", lambda x: jnp.where(x > 0, x, 0.1 * x), W),
    Row("convert_element_type", lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), (W, W)),
    Row("concatenate", lambda x: jnp.concatenate([x, jnp.tanh(x)], -1), W),
    Row("concatenate", lambda x: jnp.concatenate([x, x], 1), F, name="windowed-axis"),
    # Layouts.
    Row("rev", lambda x: jnp.flip(x, -1), W),
    Row("rev", lambda x: jnp.flip(x, 1), F, name="windowed-axis"),
    Row("transpose", lambda x: jnp.transpose(x, (0, 2, 3, 1)), W),
    Row("squeeze", lambda x: jnp.squeeze(x[..., :1], -1), W),
    Row(
        "broadcast_in_dim", lambda x: lax.broadcast_in_dim(x, (*x.shape[:3], 2, 3), (0, 1, 2, 4)), W
    ),
    Row("dot_general", lambda x: x @ constant((3, 4)), W),
    Row(
        "dot_general",
        lambda x: jnp.einsum("bhwc,hk->bkwc", x, constant((8, 2))),
        F,
        name="contracts-rows",
    ),
    Row("reduce_sum", lambda x: jnp.sum(x, -1), W),
    Row("reduce_sum", lambda x: jnp.mean(conv(x, (3, 3)), (1, 2)), FD, name="global"),
    Row("reduce_sum", lambda x: jnp.mean(conv(x, (3, 3)), (1, 2)), FD, 3, name="global"),
    Row("reduce_sum", lambda x: jnp.sum(x, 1), F, name="one-windowed-axis"),
    Row("pad", lambda x: lax.pad(x, 0.5, ((0, 0, 0), (2, 1, 0), (0, 3, 0), (1, 0, 0))), W),
    Row(
        "pad",
        lambda x: lax.pad(x, 0.0, ((0, 0, 0), (-1, 2, 0), (0, 0, 0), (0, 0, 0))),
        F,
        name="negative",
    ),
    Row(
        "pad",
        lambda x: lax.pad(x, 0.0, ((0, 0, 0), (0, 0, 1), (0, 0, 0), (0, 0, 0))),
        F,
        name="interior",
    ),
    Row("slice", lambda x: x[:, 1:-2, 2:, 1:], W),
    Row("slice", lambda x: lax.slice(x, (0, 0, 0, 0), x.shape, (1, 2, 1, 1)), F, name="strided"),
    # Sliding windows.
    Row("conv_general_dilated", lambda x: conv(x, (3, 3)), W),
    Row("conv_general_dilated", lambda x: conv(x, (1, 1)), W, name="pointwise"),
    Row(
        "conv_general_dilated",
        lambda x: conv(x, (3, 2), stride=2),
        W,
        2,
        (11, 12, 3),
        name="strided",
    ),
    Row(
        "conv_general_dilated",
        lambda x: conv(x, (3, 3), dilation=2, padding=((3, 1), (0, 2))),
        W,
        shape=(12, 11, 3),
        name="dilated",
    ),
    Row(
        "conv_general_dilated",
        lambda x: conv(conv(x, (1, 1)), (3, 3), groups=2),
        (W, W),
        name="groups",
    ),
    Row("conv_general_dilated", two_convs, (W, WD), 1, (12, 13, 3)),
    Row("conv_general_dilated", two_convs, (W, FD), 1, (7, 8, 3)),
    Row("conv_general_dilated", two_convs, (W, FD), 3, (9, 10, 3)),
    Row("conv_general_dilated", two_convs, (W, F), 5, (7, 8, 3)),
    Row("reduce_window_max", lambda x: pool(x, -jnp.inf, lax.max, 3, 2, "SAME"), W),
    Row("reduce_window_min", lambda x: pool(x, jnp.inf, lax.min, 2, 1), W),
    Row("reduce_window_sum", lambda x: pool(x, 0.0, lax.add, 2, 2), W, 2),
    Row("reduce_window", lambda x: pool(x, 0.0, lax.max, 2, 2), W),
    # No rule: computed in full.
    Row("cumsum", lambda x: jnp.cumsum(x, 1), F),
]


def candidates(shape, num_pixels: int, count: int = 8, seed: int = 0) -> np.ndarray:
    """[count, k * 5]: the first four with every pixel next to one corner (windows
    overlapping when k > 1), the rest at random places; colours beyond [0, 255]."""
    height, width = shape[:2]
    corners = [(0, 0), (height - 1, width - 1), (0, width - 1), (height - 1, 0)]
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        pixels = []
        for j in range(num_pixels):
            if i < len(corners):
                y, x = corners[i]
                y, x = abs(y - j) + 0.5, abs(x - j) + 0.5
            else:
                y, x = rng.uniform(0, height), rng.uniform(0, width)
            pixels += [y, x, *rng.uniform(-30, 285, 3)]
        rows.append(pixels)
    return np.asarray(rows, np.float32)


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.id)
def test_rule_matches_the_full_computation(row):
    def apply_fn(params, images):
        del params
        out = row.layer((images - 128.0) / 64.0)
        return out.reshape(out.shape[0], -1)

    program = incremental.trace(apply_fn, {}, row.shape, row.num_pixels)
    forms = tuple(s.form for s in program.steps if s.primitive == row.primitive)
    assert forms == (row.forms if isinstance(row.forms, tuple) else (row.forms,))

    @jax.jit
    def both(image, candidates):
        activations = incremental.clean_activations(program, {}, image)
        windowed = jax.vmap(
            lambda c: incremental.candidate_logits(program, {}, activations, image, c)
        )(candidates)
        perturbed = jax.vmap(de.apply_candidate, (None, 0))(image, candidates)
        return windowed, apply_fn({}, perturbed)

    image = np.random.default_rng(1).integers(0, 256, row.shape).astype(np.float32)
    windowed, full = both(image, candidates(row.shape, row.num_pixels))
    windowed, full = np.asarray(windowed), np.asarray(full)
    scale = np.abs(full).max()
    assert scale > 0
    np.testing.assert_allclose(windowed, full, rtol=0, atol=TOLERANCE * scale)


def test_every_rule_has_a_row():
    rows = {row.primitive for row in ROWS}
    assert set(RULES) - ELEMENTWISE <= rows
    assert len(rows & ELEMENTWISE) >= 5
