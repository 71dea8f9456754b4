"""Network in Network on CIFAR-10 (Su, Vargas & Sakurai, Sec. 4).

    python scripts/train.py --config=configs/train_nin.py:cpu --workdir=runs/train_nin

Variants (after the colon):
- `long` (the default): 100 epochs, warmup and cosine decay, for a machine with time.
- `cpu`: the recipe for a 2-core CPU: 20 epochs, one-cycle, label smoothing 0.1, crop
  and flip, the lossy-JPEG train set of ../shared/data extracted to runs/data
  (scripts/prepare_cifar10_jpeg.sh), float16 weights in the final model.
- `short`: the `cpu` recipe cut to 10 epochs, which end in about 1.5 hours on an idle
  2-core Intel Xeon (AVX-512): about 520 s an epoch with its evaluation (about 1,250 s
  on a 2-core AMD EPYC with AVX2). The shipped `checkpoints/cifar10/nin`.

The variants that take the shipped recipe apart one factor at a time
(scripts/paper_gap_zoo.sh trains and ships them under these names):
- `no_smoothing`: `short` with label smoothing 0.
- `plain`: NiN as Lin et al. trained it: `short` without batch norm and without label
  smoothing, dropout 0.5 after both pooling blocks, one-cycle to 0.1, crop and flip
  kept. Its convolutions start from He's initialisation (opa_jax.models.layers): from
  flax's default it stays near chance (loss 2.15-2.34 over the first 150 steps at
  0.1, 2.28-2.31 over 175 at 0.03); from He's, its loss falls steadily, to 1.92 at
  step 200 (train accuracy 27%, against the shipped recipe's 40%).
- `plain_noaug`: `plain` without crops and flips.
"""

from configs import train_default

LIN = {"batch_norm": False, "dropout": 0.5}  # Lin et al.'s network
# variant -> (the CPU recipe it starts from, the fields it changes, the model's options)
FACTOR_VARIANTS = {
    "no_smoothing": ("short", {"label_smoothing": 0.0}, {}),
    "plain": ("short", {"label_smoothing": 0.0, "learning_rate": 0.1}, LIN),
    "plain_noaug": ("short", {"label_smoothing": 0.0, "learning_rate": 0.1, "augment": False}, LIN),
}


def get_config(variant: str = "long"):
    config = train_default.get_config()
    config.model = "nin"
    config.num_epochs = 100
    config.learning_rate = 0.1
    config.weight_decay = 5e-4
    base, changes, model_options = FACTOR_VARIANTS.get(variant, (variant, {}, {}))
    # cpu: 3.3 h (Xeon) to 6.7 h (EPYC) on 2 idle cores; short: 1.5-3.4 h.
    train_default.apply_variant(
        config,
        base,
        "configs/train_nin.py",
        {"cpu": 20, "short": 10},
        learning_rate=0.2,
        others=tuple(FACTOR_VARIANTS),
    )
    config.update(changes)
    config.model_overrides.update(model_options)
    return config
