"""Attack your own Flax model with opa_jax's Python API, and keep the adversarial images.

    python examples/attack_flax_model.py [--out=DIR] [--num_images=8]

The model here is a small CNN with random weights, standing in for yours. Like
most PyTorch-style pipelines, it takes [0, 1] pixels normalised with the
CIFAR-10 mean and std; `opa_jax.InputConvention` states that, and the attack
still perturbs pixels 0-255. The images are the first CIFAR-10 test images from
../shared/data when present, else random pixels; since the weights are random,
the attack flips the model's own predictions.
"""

import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import opa_jax
from opa_jax.models import CIFAR10_CLASSES

_OUT = flags.DEFINE_string(
    "out", None, "Where to write the adversarial PNGs (default: a temp dir)."
)
_NUM_IMAGES = flags.DEFINE_integer("num_images", 8, "Images to attack.")
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")


class SmallCNN(nn.Module):
    """conv 3x3 16 - pool - conv 3x3 32 - pool - dense 10, on normalised NHWC input."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3), name="conv1")(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(32, (3, 3), name="conv2")(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        return nn.Dense(10, name="logits")(x.reshape(x.shape[0], -1))


def load_images(count: int) -> np.ndarray:
    """[count, 32, 32, 3] uint8: real CIFAR-10 test images if available, else random."""
    folder = os.path.join(DATA, "cifar10-test-exact")
    if os.path.isdir(folder):
        from opa_jax import data

        return data.load_dataset(f"folder:{folder}", "test", (32, 32, 3)).read(range(count))
    return np.random.default_rng(0).integers(0, 256, (count, 32, 32, 3), np.uint8)


def main(argv):
    del argv
    module = SmallCNN()
    variables = module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    model = opa_jax.Model.from_flax(
        module,
        variables,
        image_shape=(32, 32, 3),
        input_convention=opa_jax.InputConvention(
            scale=1 / 255, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)
        ),
        outputs="logits",
        class_names=CIFAR10_CLASSES,
    )
    images = load_images(_NUM_IMAGES.value)
    logits = model.apply_fn(model.params, images.astype(np.float32))
    labels = np.asarray(logits.argmax(-1))  # random weights: attack the model's own predictions

    result = opa_jax.attack_images(
        model, images, labels, pixels=1, preset="paper", popsize=40, generations=20, seed=0
    )
    columns = result.columns()  # pandas.DataFrame(columns) if you have pandas
    for i in range(len(result.records)):
        print(
            f"image {columns['image'][i]}: label {columns['true_label'][i]} -> "
            f"{columns['adv_label'][i]} ({'success' if columns['success'][i] else 'failed'}), "
            f"pixel {columns['perturbation'][i][0]}, {columns['queries'][i]} queries"
        )
    print(f"success rate {100 * result.summary['success_rate']:.1f}% over {len(result.records)}")
    out = _OUT.value or tempfile.mkdtemp(prefix="opa_jax_adversarial_")
    written = result.export(out, "png")
    print(f"{written['images']} adversarial images in {written['path']}")


if __name__ == "__main__":
    app.run(main)
