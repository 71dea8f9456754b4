"""Attack a PyTorch model with opa_jax: `Model.from_torch`, then `attack_images`.

    pip install 'opa_jax[torch]' torchvision
    python examples/attack_torch.py [--num_images=8] [--popsize=100] [--generations=20]

The model is torchvision's resnet18 with random weights, standing in for
yours; it takes [0, 1] pixels normalised with the CIFAR-10 mean and std, which
`input_convention="cifar10"` states. The images are random pixels, labelled
with the model's own predictions, so every image starts classified correctly.
"""

import argparse

import numpy as np
import torch
import torchvision

import opa_jax

parser = argparse.ArgumentParser()
parser.add_argument("--num_images", type=int, default=8)
parser.add_argument("--popsize", type=int, default=100)
parser.add_argument("--generations", type=int, default=20)
args = parser.parse_args()

torch.manual_seed(0)
net = torchvision.models.resnet18(num_classes=10).eval()  # your trained module here
model = opa_jax.Model.from_torch(net, (32, 32, 3), input_convention="cifar10")
images = np.random.default_rng(0).integers(0, 256, (args.num_images, 32, 32, 3), np.uint8)
labels = np.asarray(model.apply_fn(model.params, images.astype(np.float32)).argmax(-1))
result = opa_jax.attack_images(
    model, images, labels, pixels=1, popsize=args.popsize, generations=args.generations, seed=0
)
summary = result.summary  # clean accuracy over all images; robust: correct and not fooled
print(f"clean accuracy {summary['clean_accuracy']:.1%}")
print(f"success rate {summary['success_rate']:.1%}")
print(f"robust accuracy {summary['robust_accuracy']:.1%}")
