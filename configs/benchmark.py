"""Throughput benchmark: the imported Keras ResNet on the exact CIFAR-10 test images.

    python scripts/benchmark.py --config=configs/benchmark.py --workdir=runs/benchmark

Sized for a 2-core CPU (about 10 minutes): one XLA device per core with 1
slot each (`devices.auto_slots`), 2 generations, 3 repetitions. On an
accelerator `slots=0` fills half the free memory; raise `num_images` (about
twice the slots) and `de.generations`. Every field can be overridden with
`--config.x=y`; lists as `--config.scaling.slots='(1, 2, 4)'`.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = "keras:../shared/data/keras/resnet.h5"
    # Real images for the early-stop figure, the bf16 check and the baseline, when the
    # dataset fits the model; otherwise (or with '') random images labelled by the model.
    config.data = "folder:../shared/data/cifar10-test-exact"
    config.split = "test"
    config.seed = 0
    config.pixels = 1
    config.de = default.get_config().de  # the paper's DE (preset, popsize 400) ...
    config.de.popsize = 400
    config.de.generations = 2  # ... with few generations here; the paper runs 100
    config.precision = "float32"
    # The main section's engine: 'full' forward passes (its efficiency is against the
    # forward ceiling), 'incremental' or 'auto' (opa_jax/incremental/).
    config.evaluator = "full"
    config.slots = 0  # in-flight images per device; 0 = devices.auto_slots (1 on a CPU)
    # CPU hosts: XLA devices the cores are split into, as in attack runs (0 = one per core,
    # up to 8); the forward ceiling and the engine both run on all of them.
    config.cpu_devices = 0
    config.num_images = 4  # per engine run, early stop off: two waves of slots
    config.repetitions = 3  # timed, after one warm-up run; ceiling/engine/baseline interleaved
    config.forward_loop_calls = 3  # also time the forward pass this many times in a jitted loop
    config.breakdown = True  # time the DE step, the perturbed images and host work alone
    config.baseline = ml_collections.ConfigDict()
    config.baseline.enabled = True  # SciPy differential_evolution, one image at a time
    config.baseline.num_images = 1
    config.early_stop = ml_collections.ConfigDict()
    config.early_stop.enabled = True  # the configured stop rule (paper: p(true) < 0.05)
    config.early_stop.num_images = 6
    config.early_stop.generations = 0  # 0 = de.generations
    config.early_stop.repetitions = 1
    config.bf16 = ml_collections.ConfigDict()
    config.bf16.enabled = True
    config.bf16.engine_repetitions = 0  # > 0: also time the engine in bf16 (costs 2 runs each)
    # One engine run under jax.profiler (<workdir>/profile, for TensorBoard/XProf or Perfetto),
    # summarised as device self time per XLA operation.
    config.profile = ml_collections.ConfigDict()
    config.profile.enabled = False
    config.profile.top = 12  # operations listed
    config.memory = ml_collections.ConfigDict()
    config.memory.enabled = True
    config.memory.slots = (1, 4)  # loop memory at these slot counts (and at `slots`)
    config.scaling = ml_collections.ConfigDict()
    config.scaling.enabled = True
    config.scaling.generations = 1
    config.scaling.repetitions = 1
    config.scaling.forward_loop_calls = 2
    config.scaling.slots = (1, 2, 4)
    config.scaling.popsize = (100, 200, 400)
    config.scaling.pixels = (1, 3, 5)
    # Image size: each model at `image_popsize` x `image_slots`, `image_generations`.
    config.scaling.image_models = (
        "keras:../shared/data/keras/lenet.h5",
        "random:nin",
        "random:alexnet",
    )
    config.scaling.image_slots = 1
    config.scaling.image_popsize = 100
    config.scaling.image_generations = 1
    # Bare forward passes at these batch sizes, interleaved in rounds (slots x popsize).
    config.scaling.forward_batches = ()
    config.scaling.forward_rounds = 3
    config.scaling.devices = (1, 2)  # forced host devices, one subprocess each
    config.scaling.device_slots = 1  # per device
    # XLA_FLAGS settings compared, one process per (round, setting); "" = defaults.
    # On CPUs, XNNPACK or oneDNN convolutions can beat XLA's own (docs/benchmarks.md).
    config.xla_flags = ml_collections.ConfigDict()
    config.xla_flags.enabled = False
    config.xla_flags.flag_sets = ("", "--xla_cpu_use_xnnpack=true", "--xla_cpu_use_onednn=true")
    config.xla_flags.rounds = 2
    config.xla_flags.slots = 0  # 0 = `slots`
    config.xla_flags.generations = 1
    config.xla_flags.forward_loop_calls = 2
    # The incremental evaluator against the full one (and the forward pass), per model, at
    # one slot of `popsize` (0 = de.popsize) per device, interleaved; `more_pixels` too for
    # `more_pixels_models`. configs/benchmark_incremental.py runs it alone.
    config.incremental = ml_collections.ConfigDict()
    config.incremental.enabled = False
    config.incremental.models = (
        "keras:../shared/data/keras/lenet.h5",
        "keras:../shared/data/keras/resnet.h5",
        "random:nin",
        "random:allconv",
        "random:vgg16",
        "random:alexnet",
    )
    config.incremental.pixels = (1,)
    config.incremental.more_pixels_models = ("random:nin",)
    config.incremental.more_pixels = (3, 5)
    config.incremental.popsize = 0
    config.incremental.repetitions = 3
    config.incremental.loop_calls = 2
    # The exhaustive one-pixel search (stop at the first fooling candidate) against the
    # configured DE with its stop rule, on the first `num_images` images, interleaved.
    # configs/benchmark_search.py runs it alone on the shipped NiN.
    config.search = ml_collections.ConfigDict()
    config.search.enabled = False
    config.search.num_images = 8
    config.search.repetitions = 2
    config.search.colours = "corners"
    config.search.popsize = 512  # grid candidates per generation
    config.search.de_generations = 100  # DE's here: the paper's (de.generations is the main's)
    return config
