"""Replaying attack results outside the engine: the recorded pixels, written by hand.

An attack record says which pixels it wrote (`perturbation`, x = row) and what
the model said on that image (`adv_probs`). Writing those pixels into the clean
image with NumPy and running the model again must give the same probabilities;
this checks the engine's bookkeeping against an independent path.
"""

import jax
import jax.numpy as jnp
import numpy as np


def write_perturbation(image: np.ndarray, perturbation) -> np.ndarray:
    """The clean image [H, W, 3] with each (x, y, r, g, b) written at row x, column y."""
    out = np.array(image, np.float32)
    for x, y, r, g, b in np.asarray(perturbation, np.float64).reshape(-1, 5):
        assert x == int(x) and y == int(y), (x, y)  # the record holds applied, integer positions
        out[int(x), int(y)] = (r, g, b)
    return out


def model_probs(model, images) -> np.ndarray:
    """Softmax of the model's logits, [N, C], in float32."""
    logits = jax.jit(model.apply_fn)(model.params, jnp.asarray(images, jnp.float32))
    return np.asarray(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))


def expected_success(probs, true_label, target_label) -> bool:
    """The engine's rule: the argmax differs from the true label, or equals the target."""
    predicted = int(np.argmax(probs))
    return predicted == target_label if target_label is not None else predicted != true_label


def fgsm_reference(model, image, label, targeted: bool, epsilon: float) -> np.ndarray:
    """FGSM (Goodfellow et al. 2015) for one image, written apart from opa_jax.baselines:
    x + epsilon * sign(grad of the cross-entropy of `label`), descending it when targeted,
    clipped to [0, 255] and rounded. Returns the adversarial image, float64 [H, W, 3]."""

    def cross_entropy(x):
        logits = model.apply_fn(model.params, x[None])[0].astype(jnp.float32)
        return -jax.nn.log_softmax(logits)[label]

    gradient = np.asarray(jax.grad(cross_entropy)(jnp.asarray(image, jnp.float32)))
    step = -epsilon if targeted else epsilon
    return np.round(np.clip(np.asarray(image, np.float64) + step * np.sign(gradient), 0, 255))
