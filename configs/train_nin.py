"""Network in Network on CIFAR-10 (Su, Vargas & Sakurai, Sec. 4)."""

from configs import train_default


def get_config():
    config = train_default.get_config()
    config.model = "nin"
    config.num_epochs = 100
    config.learning_rate = 0.1
    config.weight_decay = 5e-4
    return config
