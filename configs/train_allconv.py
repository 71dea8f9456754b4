"""All-CNN-C on CIFAR-10 (Su, Vargas & Sakurai, Sec. 4).

    python scripts/train.py --config=configs/train_allconv.py:cpu --workdir=runs/train_allconv

Variants: `long` (the default, 150 epochs); `cpu`, the short recipe for a 2-core CPU
(25 epochs, one-cycle; see configs/train_nin.py and train_default.apply_cpu_recipe);
`session`, the same cut to 8 epochs, meant to end inside one 3-hour session.
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
    # cpu: about 11 h on a 2-core machine of sessions 5-8; session: about 2 h on session 9's.
    # session: about 3.4 h on an AVX2-only machine (session 11, 31 images/s).
    train_default.apply_variant(config, variant, "configs/train_allconv.py",
                                {"cpu": 25, "session": 8}, learning_rate=0.1)  # fmt: skip
    return config
