"""Network in Network on CIFAR-10 (Su, Vargas & Sakurai, Sec. 4).

    python scripts/train.py --config=configs/train_nin.py:cpu --workdir=runs/train_nin

Variants (after the colon):
- `long` (the default): 100 epochs, warmup and cosine decay, for a machine with time.
- `cpu`: the short recipe for a 2-core CPU (issue 16): 20 epochs, one-cycle, label
  smoothing 0.1, crop and flip, the lossy-JPEG train set of ../shared/data extracted to
  runs/data (scripts/prepare_cifar10_jpeg.sh), float16 weights in the final model.
"""

from configs import train_default


def get_config(variant: str = "long"):
    config = train_default.get_config()
    config.model = "nin"
    config.num_epochs = 100
    config.learning_rate = 0.1
    config.weight_decay = 5e-4
    if variant == "cpu":
        train_default.apply_cpu_recipe(config, num_epochs=20, learning_rate=0.2)
    elif variant != "long":
        raise ValueError(f"configs/train_nin.py:{variant}: expected the variant long or cpu")
    return config
