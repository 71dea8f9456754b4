"""Shared defaults for scripts/train.py; the per-model configs override these.

Any field can be set on the command line, e.g. `--config.num_epochs=10` or
`--config.model_overrides.width=0.5`.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Model: a zoo name (nin, allconv, vgg16) and options of its module.
    config.model = "nin"
    config.model_overrides = ml_collections.ConfigDict(
        {
            "width": config_dict.placeholder(float),  # width multiplier (1.0 = the paper's)
            "batch_norm": config_dict.placeholder(bool),
            "dropout": config_dict.placeholder(float),
        }
    )

    # Data: `tfds:cifar10` or `folder:PATH` (PATH/train/<class>/*, PATH/test/<class>/*).
    config.dataset = "tfds:cifar10"
    config.train_split = "train"
    config.test_split = "test"
    # Also reported at the end when present: the bit-exact CIFAR-10 test images.
    config.exact_test_data = "folder:../shared/data/cifar10-test-exact"
    config.data_cache_dir = ""  # keep decoded splits here as .npy ("" = no cache)

    config.seed = 0
    config.batch_size = 128
    config.eval_batch_size = 500
    config.num_epochs = 100
    config.num_steps = -1  # > 0 overrides num_epochs

    # Optimiser: sgd (momentum, optionally Nesterov) or adamw; weight decay on kernels only.
    config.optimizer = "sgd"
    config.learning_rate = 0.1
    config.momentum = 0.9
    config.nesterov = True
    config.weight_decay = 5e-4
    config.schedule = "warmup_cosine"  # warmup_cosine | one_cycle | constant
    config.warmup_epochs = 2.0
    config.one_cycle_pct_start = 0.25
    config.label_smoothing = 0.0

    # Augmentation on device: random crop after zero padding, horizontal flip.
    config.augment = True
    config.crop_padding = 4
    # Progressive resizing: "SIZE:UNTIL,..." trains on images resized to SIZE pixels high
    # until the fraction UNTIL of the steps, then at the next size, the native one last,
    # e.g. "16:0.35,24:0.6"; "" = off. Fully convolutional models only (NiN, All-CNN-C).
    config.progressive_resizing = ""

    config.compute_dtype = "float32"  # bfloat16: mixed precision (params stay float32)
    config.save_dtype = "float32"  # weights in the model checkpoint: float32|float16|bfloat16

    # Execution (changes results only by float rounding): the XLA devices a CPU host is
    # split into for data-parallel steps; 0 = one per core (opa_jax.devices.set_cpu_devices).
    config.cpu_devices = 0

    config.log_every = 100
    config.eval_every_epochs = 0.0  # > 0: test accuracy this often, into <workdir>/history.jsonl
    config.checkpoint_every = 1000
    # > 0: also checkpoint once this many seconds have passed since the last checkpoint,
    # so that a kill loses at most that much (SIGTERM checkpoints and stops at once).
    config.checkpoint_every_seconds = 0.0
    config.stop_after_steps = 0  # > 0: stop after this step's checkpoint, as if killed (tests)
    # > 0: stop with a checkpoint (scripts/train.py exits 3) when the elapsed time plus the
    # ETA exceeds this many hours at the first log line by 2x, or at each of the first three
    # at the fastest rate seen, so that a run that cannot end inside a time slot on this
    # machine gives up in minutes, not at the slot's end.
    config.max_hours = 0.0
    return config


# Where scripts/prepare_cifar10_jpeg.sh extracts ../shared/data/cifar10-jpeg.tar.gz.
CPU_DATASET = "folder:runs/data/cifar10-jpeg"


# The short CPU recipes' variants (after the colon of --config=configs/train_<name>.py:...).
CPU_VARIANTS = ("cpu", "short")


def apply_variant(
    config: ml_collections.ConfigDict,
    variant: str,
    config_file: str,
    epochs: dict,
    learning_rate: float,
    others: tuple[str, ...] = (),
) -> None:
    """Applies `variant` of a training config: `long` leaves it as it is; `cpu` and
    `short` apply the CPU recipe with `epochs[variant]` epochs (`short` is cut to the
    epochs that end in about two hours on 2 idle cores). `others` are the config file's
    own variants, named in the error for an unknown one."""
    if variant in CPU_VARIANTS:
        apply_cpu_recipe(config, num_epochs=epochs[variant], learning_rate=learning_rate)
    elif variant != "long":
        choices = ", ".join(("long", *CPU_VARIANTS, *others))
        raise ValueError(f"{config_file}:{variant}: expected a variant among {choices}")


def apply_cpu_recipe(config: ml_collections.ConfigDict, num_epochs: int, learning_rate: float):
    """The short schedule for a 2-core CPU: one-cycle to `learning_rate`,
    label smoothing, crop and flip, the lossy-JPEG train set, float16 weights saved."""
    config.dataset = CPU_DATASET
    config.data_cache_dir = "runs/data/cache"  # decoded splits as .npy: restarts skip the JPEGs
    config.num_epochs = num_epochs
    config.schedule = "one_cycle"
    config.learning_rate = learning_rate
    config.one_cycle_pct_start = 0.25
    config.label_smoothing = 0.1
    config.augment = True
    config.save_dtype = "float16"
    config.checkpoint_every = 200  # about 10 minutes of steps on 2 idle cores
    config.checkpoint_every_seconds = 300.0  # and at least every 5 minutes on a shared one
    config.eval_every_epochs = 1.0  # the epochs-to-accuracy curve
    # One XLA device: two barely beat one here (docs/models.md), and the all-reduce of a
    # data-parallel step aborts the process when the other device's thread is starved for
    # 40 s, which a job at `nice -n 19` on a shared machine can be.
    config.cpu_devices = 1
