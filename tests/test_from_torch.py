"""`opa_jax.Model.from_torch`: a PyTorch module exported to ONNX in memory, run by the importer.

Parity against torch's own output on small modules (conv, batch norm, ReLU,
pooling, linear), the input convention, the exporters, the errors, and
examples/attack_torch.py end to end. torch is an optional extra: without it
these tests skip, saying so, except the one that checks the error naming it.
"""

import importlib
import subprocess
import sys

import numpy as np
import pytest
from test_run import REPO

import opa_jax
from opa_jax.errors import InputError


def importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - e.g. torchvision built for another torch
        return False
    return True


HAVE_TORCH = importable("torch")
needs_torch = pytest.mark.skipif(
    not HAVE_TORCH, reason="torch is not installed (pip install 'opa_jax[torch]')"
)
needs_onnxscript = pytest.mark.skipif(
    not importable("onnxscript"), reason="onnxscript is not installed (the dynamo exporter's)"
)
CIFAR = opa_jax.InputConvention(
    scale=1 / 255, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)
)


def small_net(head: str = "pool"):
    """conv-bn-relu-maxpool, conv(stride 2)-bn-relu, then global average pooling
    ("pool") or a flatten ("flatten") into a linear layer; batch-norm statistics
    and affine parameters away from their initial values, so that they count."""
    import torch

    torch.manual_seed(0)
    layers = [
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
    ]
    if head == "pool":
        layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10)]
    else:
        layers += [torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.LazyLinear(10)]
    net = torch.nn.Sequential(*layers)
    with torch.no_grad():
        net(torch.zeros(1, 3, 32, 32))  # materialises LazyLinear
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.5, 2)
                module.bias.uniform_(-1, 1)
    return net.eval()


def torch_logits(net, pixels, convention) -> np.ndarray:
    """The module's own output on [N, H, W, 3] pixels 0-255 under `convention`."""
    import torch

    x = np.asarray(convention.apply(pixels)).transpose(0, 3, 1, 2).copy()
    with torch.no_grad():
        return net.eval()(torch.from_numpy(x)).numpy()


def pixels(count=4, shape=(32, 32, 3), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, *shape)).astype(np.float32)


def assert_parity(model, net, images, convention):
    ours = np.asarray(model.apply_fn(model.params, images))
    theirs = torch_logits(net, images, convention)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


@needs_torch
@pytest.mark.parametrize("head", ["pool", "flatten"])
def test_parity_with_torch_torchscript_exporter(head):
    net = small_net(head)
    model = opa_jax.Model.from_torch(net, (32, 32, 3), input_convention=CIFAR)
    assert model.image_shape == (32, 32, 3) and model.num_classes == 10
    assert model.meta["opset"] == 17 and model.meta["exporter"] == "torchscript"
    assert_parity(model, net, pixels(), CIFAR)


@needs_torch
@needs_onnxscript
def test_parity_with_torch_dynamo_exporter():
    net = small_net("pool")
    model = opa_jax.Model.from_torch(net, (32, 32, 3), input_convention="cifar10",
                                     exporter="dynamo")  # fmt: skip
    assert model.meta["exporter"] == "dynamo"
    assert_parity(model, net, pixels(), opa_jax.models.convention.named("cifar10"))


@needs_torch
def test_parity_with_torch_on_attention():
    """A transformer encoder layer, which torch runs in eval mode as one fused op that
    the TorchScript exporter cannot write unless its fast path is off."""
    import torch

    class TinyTransformer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.patches = torch.nn.Conv2d(3, 16, 8, stride=8)
            self.encoder = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0,
                                                            batch_first=True)  # fmt: skip
            self.head = torch.nn.Linear(16, 10)

        def forward(self, x):
            tokens = self.patches(x).flatten(2).transpose(1, 2)  # [N, 16 patches, 16]
            return self.head(self.encoder(tokens).mean(1))

    torch.manual_seed(0)
    net = TinyTransformer().eval()
    model = opa_jax.Model.from_torch(net, (32, 32, 3), input_convention=CIFAR)
    assert "LayerNormalization" in model.meta["operators"]
    assert_parity(model, net, pixels(), CIFAR)


@needs_torch
def test_torch_image_shape_non_square_and_another_opset():
    net = small_net("pool")
    model = opa_jax.Model.from_torch(net, (3, 24, 16), input_convention="unit", opset=13)
    assert model.image_shape == (24, 16, 3) and model.meta["opset"] == 13
    unit = opa_jax.InputConvention(scale=1 / 255)
    assert_parity(model, net, pixels(3, (24, 16, 3)), unit)


@needs_torch
def test_a_grayscale_module():
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 26 * 26, 10),
    ).eval()
    model = opa_jax.Model.from_torch(net, (1, 28, 28))
    assert model.image_shape == (28, 28, 1)
    assert_parity(model, net, pixels(2, (28, 28, 1)), opa_jax.InputConvention())


@needs_torch
def test_exported_in_eval_mode_and_left_in_its_mode():
    net = small_net("flatten").train()  # dropout on, batch norm on batch statistics
    model = opa_jax.Model.from_torch(net, (32, 32, 3))
    assert net.training
    images = pixels(2)
    first = np.asarray(model.apply_fn(model.params, images))
    np.testing.assert_array_equal(first, np.asarray(model.apply_fn(model.params, images)))
    theirs = torch_logits(net, images, opa_jax.InputConvention())  # eval-mode output
    assert np.abs(first - theirs).max() <= 1e-4 * np.abs(theirs).max()


@needs_torch
def test_a_final_softmax_is_dropped_so_the_model_returns_logits():
    import torch

    net = torch.nn.Sequential(small_net("pool"), torch.nn.Softmax(dim=1)).eval()
    model = opa_jax.Model.from_torch(net, (32, 32, 3), input_convention=CIFAR, name="probs")
    assert model.name == "probs" and model.meta["dropped_final"] == "Softmax"
    ours = np.asarray(model.apply_fn(model.params, pixels(2)))
    probabilities = np.exp(ours) / np.exp(ours).sum(-1, keepdims=True)
    np.testing.assert_allclose(probabilities, torch_logits(net, pixels(2), CIFAR), atol=1e-6)


@needs_torch
def test_the_attack_runs_on_a_torch_model():
    net = small_net("pool")
    model = opa_jax.Model.from_torch(net, (32, 32, 3), input_convention=CIFAR)
    images = pixels(3).astype(np.uint8)
    labels = torch_logits(net, images.astype(np.float32), CIFAR).argmax(-1)
    result = opa_jax.attack_images(model, images, labels, popsize=8, generations=2, seed=0)
    assert [r["image"] for r in result.records] == [0, 1, 2]
    assert all(r["true_label"] == labels[r["image"]] for r in result.records)


@needs_torch
def test_bad_arguments_are_named():
    net = small_net("pool")
    with pytest.raises(InputError, match="exporter='tf'"):
        opa_jax.Model.from_torch(net, (32, 32, 3), exporter="tf")
    with pytest.raises(InputError, match=r"image_shape=\[32, 32\]"):
        opa_jax.Model.from_torch(net, (32, 32))
    with pytest.raises(InputError, match="expected a torch.nn.Module"):
        opa_jax.Model.from_torch(lambda x: x, (32, 32, 3))
    with pytest.raises(InputError, match="input normalization 'imagenette'"):
        opa_jax.Model.from_torch(net, (32, 32, 3), input_convention="imagenette")


def test_without_torch_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'opa_jax\[torch\]'"):
        opa_jax.Model.from_torch(object(), (32, 32, 3))


@pytest.mark.skipif(
    not (HAVE_TORCH and importable("torchvision")),
    reason="examples/attack_torch.py needs torch and torchvision (pip install 'opa_jax[torch]' "
    "torchvision)",
)
def test_example_attack_torch_runs():
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "attack_torch.py"), "--num_images=3",
         "--popsize=10", "--generations=2"],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.rsplit(" ", 1) for line in done.stdout.strip().splitlines())
    rates = {key: float(value.rstrip("%")) / 100 for key, value in lines.items()}
    # Labelled with its own predictions: every image is classified correctly at first,
    # and the robust ones are those the attack did not fool.
    assert rates["clean accuracy"] == 1.0
    assert rates["robust accuracy"] == pytest.approx(1 - rates["success rate"], abs=1e-3)
