"""VGG16 (batch norm, fc 2048) on CIFAR-10 (Su, Vargas & Sakurai, Sec. 4)."""

from ml_collections import config_dict

from configs import train_default


def get_config():
    config = train_default.get_config()
    config.model = "vgg16"
    config.model_overrides.fc_units = config_dict.placeholder(int)
    config.num_epochs = 150
    config.learning_rate = 0.05
    config.weight_decay = 5e-4
    return config
