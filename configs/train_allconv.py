"""All-CNN-C on CIFAR-10 (Su, Vargas & Sakurai, Sec. 4)."""

from ml_collections import config_dict

from configs import train_default


def get_config():
    config = train_default.get_config()
    config.model = "allconv"
    config.model_overrides.input_dropout = config_dict.placeholder(float)
    config.num_epochs = 150
    config.learning_rate = 0.05
    config.weight_decay = 5e-4
    return config
