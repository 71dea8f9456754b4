"""VGG16 (batch norm, fc 2048) on CIFAR-10 (Su, Vargas & Sakurai, Sec. 4).

    python scripts/train.py --config=configs/train_vgg16.py:cpu --workdir=runs/train_vgg16

Variants: `long` (the default, 150 epochs); `cpu`, the short recipe for a 2-core CPU
(20 epochs, one-cycle, no dropout, progressive resizing 16 -> 24 -> 32 pixels; see
configs/train_nin.py and train_default.apply_cpu_recipe);
`short`, the same cut to 8 epochs, which end in about two hours on 2 idle cores.
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
    # cpu: about 9 h on a slow 2-core CPU; short: about 1.7 h on a 2-core AMD EPYC (AVX2).
    train_default.apply_variant(config, variant, "configs/train_vgg16.py",
                                {"cpu": 20, "short": 8}, learning_rate=0.1)  # fmt: skip
    if variant in train_default.CPU_VARIANTS:
        # As All-CNN-C's (docs/models.md): no dropout, which short runs underfit with, and
        # progressive resizing, which VGG16 takes since its pools pass a 1x1 map as it is.
        # 8 native epochs take 2.7-2.9 h on a 2-core AMD EPYC (AVX2); the resized
        # schedule costs about 0.64 of that.
        config.model_overrides.dropout = 0.0
        config.progressive_resizing = "16:0.3,24:0.6"
    return config
