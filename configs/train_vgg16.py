"""VGG16 (batch norm, fc 2048) on CIFAR-10 (Su, Vargas & Sakurai, Sec. 4).

    python scripts/train.py --config=configs/train_vgg16.py:cpu --workdir=runs/train_vgg16

Variants: `long` (the default, 150 epochs) and `cpu`, the short recipe for a 2-core CPU
(20 epochs, one-cycle; see configs/train_nin.py and train_default.apply_cpu_recipe).
"""

from ml_collections import config_dict

from configs import train_default


def get_config(variant: str = "long"):
    config = train_default.get_config()
    config.model = "vgg16"
    config.model_overrides.fc_units = config_dict.placeholder(int)
    config.num_epochs = 150
    config.learning_rate = 0.05
    config.weight_decay = 5e-4
    if variant == "cpu":
        train_default.apply_cpu_recipe(config, num_epochs=20, learning_rate=0.1)
    elif variant != "long":
        raise ValueError(f"configs/train_vgg16.py:{variant}: expected the variant long or cpu")
    return config
