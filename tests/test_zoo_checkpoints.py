"""The paper's CIFAR-10 networks as shipped in checkpoints/cifar10/.

Each shipped model is loaded as the attacks load it (`ckpt:`), and its accuracy on
the 1,017 exact CIFAR-10 test images must be the one its model card records. A
network not trained yet is reported as a skip, naming it.
"""

import os

import numpy as np
import pytest
import realdata

from configs import common
from opa_jax import data
from opa_jax.models import checkpoint, load_model

NETWORKS = ("nin", "allconv", "vgg16")
TARGETS = {"nin": 0.86, "allconv": 0.87, "vgg16": 0.89}  # the accuracy targets
# NiN's recipe variants (configs/train_nin.py; scripts/paper_gap_zoo.sh ships them): the
# architecture is NiN's, so their model.json names "nin".
VARIANTS = ("nin_no_smoothing", "nin_plain", "nin_plain_noaug")
ARCHITECTURE = {name: "nin" for name in VARIANTS}


def shipped(name: str) -> str:
    path = realdata.REPO / "checkpoints" / "cifar10" / name
    if not path.is_dir():
        job = "scripts/paper_gap_zoo.sh" if name in VARIANTS else "scripts/paper_zoo.sh"
        pytest.skip(f"{path} is not shipped yet ({job} trains and ships it)")
    return str(path)


@pytest.mark.parametrize("name", NETWORKS + VARIANTS)
def test_config_default_is_the_shipped_checkpoint(name):
    assert common.CIFAR10_MODELS[name] == f"ckpt:checkpoints/cifar10/{name}"
    description = checkpoint.read_model_json(shipped(name))
    assert description["model"] == ARCHITECTURE.get(name, name)
    assert description["weights_dtype"] == "float16"
    weights = os.path.join(shipped(name), description["weights_file"])
    assert os.path.getsize(weights) < 45e6  # float16 keeps VGG16 near 30 MB
    assert description["num_classes"] == 10 and description["model_config"].get("width", 1) == 1


@pytest.mark.realdata
@pytest.mark.parametrize("name", NETWORKS + VARIANTS)
def test_shipped_checkpoint_accuracy_on_the_exact_images(name):
    path = shipped(name)
    realdata.require(realdata.CIFAR10_EXACT)
    model = load_model(f"ckpt:{path}")
    dataset = data.load_dataset(f"folder:{realdata.CIFAR10_EXACT}", "test")
    images = dataset.read(range(len(dataset))).astype(np.float32)
    labels = dataset.labels
    logits = np.concatenate([np.asarray(model.apply_fn(model.params, images[i:i + 128]))
                             for i in range(0, len(images), 128)])  # fmt: skip
    correct = int(np.sum(np.argmax(logits, -1) == labels))
    recorded = model.meta["accuracies"]["exact_test"]
    assert recorded["count"] == len(labels) == realdata.NUM_EXACT_IMAGES
    assert correct == recorded["correct"], (correct, recorded)
    assert tuple(model.class_names) == tuple(dataset.class_names)
    # Reaching the target is recorded, not required: a network that missed it in
    # its CPU budget is shipped as the best model, with its card saying so.
    target = TARGETS.get(ARCHITECTURE.get(name, name))
    print(f"{name}: {correct}/{len(labels)} = {correct / len(labels):.4f} (target {target})")
