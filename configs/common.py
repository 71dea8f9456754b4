"""The experiment grid as one helper over `configs/default.py`.

Experiment configs take their experiment as ml_collections' config string,
`--config=configs/cifar10.py:MODEL,PIXELS,MODE`, e.g. `nin,3,targeted`; see
configs/README.md for the grid.
"""

import ml_collections

from configs import default

# The exact test images of ../shared/data where they exist, else tfds (which downloads
# CIFAR-10 on a machine with a network and TensorFlow); else a clear error.
CIFAR10_EXACT = "folder:../shared/data/cifar10-test-exact|tfds:cifar10"

# CIFAR-10 models by name: the paper's zoo, trained by scripts/train.py into
# checkpoints/cifar10/<name>; NiN's variants one factor nearer the paper's recipe
# (configs/train_nin.py, trained and shipped by scripts/paper_gap_zoo.sh); and the Keras
# models of one-pixel-attack-keras.
CIFAR10_MODELS = {
    "nin": "ckpt:checkpoints/cifar10/nin",
    "allconv": "ckpt:checkpoints/cifar10/allconv",
    "vgg16": "ckpt:checkpoints/cifar10/vgg16",
    "nin_no_smoothing": "ckpt:checkpoints/cifar10/nin_no_smoothing",
    "nin_plain": "ckpt:checkpoints/cifar10/nin_plain",
    "nin_plain_noaug": "ckpt:checkpoints/cifar10/nin_plain_noaug",
    "lenet": "keras:../shared/data/keras/lenet.h5",
    "resnet": "keras:../shared/data/keras/resnet.h5",
}
PIXELS = (1, 3, 5)  # the paper's pixel counts (Sec. IV)
MODES = {"nontargeted": False, "targeted": True}


def experiment(model: str, pixels: int, targeted: bool) -> ml_collections.ConfigDict:
    """The default config for one CIFAR-10 model, pixel count and mode."""
    config = default.get_config()
    config.data = CIFAR10_EXACT
    config.model = CIFAR10_MODELS[model]
    config.pixels = pixels
    config.targeted = targeted
    return config


def parse(arg: str | None, with_pixels: bool = True) -> tuple[str, int, bool]:
    """'MODEL,PIXELS,MODE' (or 'MODEL,MODE' without pixels) -> (model, pixels, targeted)."""
    usage = "MODEL,PIXELS,MODE" if with_pixels else "MODEL,MODE"
    example = "nin,3,targeted" if with_pixels else "lenet,nontargeted"
    hint = (
        f"expected the config string {usage}, e.g. --config=configs/<file>.py:{example}, "
        f"with MODEL in {sorted(CIFAR10_MODELS)}"
        + (f", PIXELS in {list(PIXELS)}" if with_pixels else "")
        + f" and MODE in {sorted(MODES)}"
    )
    parts = [p.strip() for p in (arg or "").split(",")]
    if len(parts) != (3 if with_pixels else 2):
        raise ValueError(f"config string {arg!r}: {hint}")
    model, mode = parts[0], parts[-1]
    pixels = parts[1] if with_pixels else "1"
    if model not in CIFAR10_MODELS or mode not in MODES or not pixels.isdigit():
        raise ValueError(f"config string {arg!r}: {hint}")
    if with_pixels and int(pixels) not in PIXELS:
        raise ValueError(f"config string {arg!r}: {hint} (other counts: --config.pixels=N)")
    return model, int(pixels), MODES[mode]


def every_arg(with_pixels: bool = True) -> list[str]:
    """Every config string of the grid (for tests and sweeps)."""
    return [
        f"{model},{pixels},{mode}" if with_pixels else f"{model},{mode}"
        for model in CIFAR10_MODELS
        for pixels in (PIXELS if with_pixels else (1,))
        for mode in MODES
    ]
