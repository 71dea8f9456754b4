"""Grayscale digits: MNIST (or Fashion-MNIST), 28 x 28 x 1 images.

    --config=configs/mnist.py --config.model=ckpt:DIR     # or onnx:model.onnx, keras:FILE.h5

A pixel of a one-channel image is (x, y, v): DE draws v from N(128, 127)
clipped, and the exhaustive search's corner colours are black and white.
The data come from tfds (`tfds:mnist`, or `--config.data=tfds:fashion_mnist`,
prepared as ArrayRecord; README) or from a folder of grayscale PNGs
(`folder:PATH`). The model defaults to LeNet-5 (`opa_jax/models/lenet5.py`)
with seed-0 random weights, `random:lenet5`, which runs the whole pipeline but
is not a trained network: set `config.model` to a trained one.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.data = "tfds:mnist"
    config.model = "random:lenet5"
    return config
