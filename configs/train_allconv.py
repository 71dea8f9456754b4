"""All-CNN-C on CIFAR-10 (Su, Vargas & Sakurai, Sec. 4).

    python scripts/train.py --config=configs/train_allconv.py:cpu --workdir=runs/train_allconv

Variants: `long` (the default, 150 epochs) and `cpu`, the short recipe for a 2-core CPU
(25 epochs, one-cycle; see configs/train_nin.py and train_default.apply_cpu_recipe).
"""

from ml_collections import config_dict

from configs import train_default


def get_config(variant: str = "long"):
    config = train_default.get_config()
    config.model = "allconv"
    config.model_overrides.input_dropout = config_dict.placeholder(float)
    config.num_epochs = 150
    config.learning_rate = 0.05
    config.weight_decay = 5e-4
    if variant == "cpu":
        train_default.apply_cpu_recipe(config, num_epochs=25, learning_rate=0.1)
    elif variant != "long":
        raise ValueError(f"configs/train_allconv.py:{variant}: expected the variant long or cpu")
    return config
