"""Network in Network on CIFAR-10 (Su, Vargas & Sakurai, Sec. 4).

    python scripts/train.py --config=configs/train_nin.py:cpu --workdir=runs/train_nin

Variants (after the colon):
- `long` (the default): 100 epochs, warmup and cosine decay, for a machine with time.
- `cpu`: the short recipe for a 2-core CPU (issue 16): 20 epochs, one-cycle, label
  smoothing 0.1, crop and flip, the lossy-JPEG train set of ../shared/data extracted to
  runs/data (scripts/prepare_cifar10_jpeg.sh), float16 weights in the final model.
- `session`: the `cpu` recipe cut to 10 epochs, which end inside one 3-hour working
  session: about 600 s an epoch on the 2 cores of session 9's machine (88 images/s;
  the machines of sessions 5-8 took about 1,250 s). These machines start afresh
  between sessions and only committed files survive, so a longer run never ends.
"""

from configs import train_default


def get_config(variant: str = "long"):
    config = train_default.get_config()
    config.model = "nin"
    config.num_epochs = 100
    config.learning_rate = 0.1
    config.weight_decay = 5e-4
    # cpu: 3.3-6.7 h on 2 idle cores (by machine); session: 1.7-3.4 h.
    train_default.apply_variant(config, variant, "configs/train_nin.py",
                                {"cpu": 20, "session": 10}, learning_rate=0.2)  # fmt: skip
    return config
