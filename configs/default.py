"""Shared defaults for every attack config; experiment configs override a few fields.

Any field can be set on the command line, e.g. `--config.de.popsize=100`.
`de.*` fields left as None take the value of the chosen `de.preset`.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # What to attack.
    # folder:PATH or tfds:NAME; alternatives joined by | are tried in order (a missing
    # folder is passed over): the exact images of ../shared/data, else tfds.
    config.data = "folder:../shared/data/cifar10-test-exact|tfds:cifar10"
    config.split = "test"
    config.data_dir = ""  # tfds data_dir (ImageNet: its downloads/manual holds the tars)
    config.resize = "none"  # none, or center_crop (resize + centre crop to the model's size)
    config.selection = ""  # '' all, 'A:B' dataset-index range, or 'i,j,k'
    config.num_images = 0  # attack the first N eligible images by dataset index; 0 = all
    config.only_correct = True  # the paper attacks correctly classified images only
    # The model.
    config.model = "keras:../shared/data/keras/lenet.h5"  # keras:, ckpt:, alexnet:, onnx:, random:
    config.allow_pickle = False  # needed for alexnet:*.npy (pickle); convert to .npz instead
    # onnx: models only: the input the graph expects (docs/models.md). By default it gets
    # float RGB pixels 0-255 as they are; graph input = (pixels * scale - mean) / std.
    config.onnx = ml_collections.ConfigDict()
    config.onnx.normalization = "none"  # none, unit, imagenet, cifar10, cifar10_legacy, ...
    config.onnx.scale = config_dict.placeholder(float)  # set fields replace the named ones
    config.onnx.mean = ""  # 'r,g,b' in scaled units, e.g. '0.485,0.456,0.406'
    config.onnx.std = ""
    config.onnx.channel_order = ""  # rgb or bgr
    config.onnx.image_size = ""  # 'H,W' for a graph whose input height and width are dynamic
    # The attack.
    # de (DE or random search, by de.preset), exhaustive, corner_search, min_pixels or fgsm
    config.method = "de"
    config.pixels = 1
    config.targeted = False
    config.targets = "all"  # targeted: 'all' other classes, or a comma list of class indices
    config.seed = 0
    config.de = ml_collections.ConfigDict()
    config.de.preset = "paper"  # paper, scipy or random
    config.de.popsize = config_dict.placeholder(int)
    config.de.generations = config_dict.placeholder(int)
    config.de.strategy = config_dict.placeholder(str)
    config.de.mutation = config_dict.placeholder(float)
    config.de.mutation_high = config_dict.placeholder(float)
    config.de.crossover = config_dict.placeholder(float)
    config.de.init = config_dict.placeholder(str)
    config.de.bounds_handling = config_dict.placeholder(str)
    config.de.stop = config_dict.placeholder(str)
    config.de.nontargeted_threshold = config_dict.placeholder(float)
    config.de.targeted_threshold = config_dict.placeholder(float)
    config.de.round_rgb = config_dict.placeholder(bool)
    # method=exhaustive: every position times every colour of a set, one pixel.
    config.exhaustive = ml_collections.ConfigDict()
    config.exhaustive.colours = "corners"  # corners (8), or levels:N (N**3 colours)
    config.exhaustive.stop = "first"  # first fooling candidate in raster order, or none
    config.exhaustive.popsize = 512  # grid candidates per generation
    # method=corner_search: random search over corner colours, one pixel moved at a time.
    config.corner_search = ml_collections.ConfigDict()
    config.corner_search.popsize = 400
    config.corner_search.generations = 100
    config.corner_search.colours = "corners"
    config.corner_search.stop = "argmax"  # argmax, threshold (the paper's) or none
    # method=min_pixels: the exhaustive one-pixel search, then each k of `ks` on the
    # images not yet fooled, with `search` at its budget (popsize x generations).
    config.min_pixels = ml_collections.ConfigDict()
    config.min_pixels.ks = "2,3,5,10"
    config.min_pixels.search = "corner_search"  # corner_search or de (config.de.*)
    config.min_pixels.popsize = 100
    config.min_pixels.generations = 100
    config.fgsm = ml_collections.ConfigDict()
    config.fgsm.epsilon = 8.0  # L-inf, in pixel units 0-255
    config.precision = "float32"  # float32 or bfloat16 model forward passes
    # Execution (does not change results).
    # How candidates are evaluated: 'full' forward passes, 'incremental' (recompute only
    # what the pixels reach, from each image's clean activations; opa_jax/incremental/),
    # or 'auto': incremental where XLA counts fewer FLOPs for it (docs/benchmarks.md).
    config.evaluator = "auto"
    config.slots = 0  # in-flight images per device; 0 = choose from memory
    config.chunk_size = 0  # work items per device loop call; 0 = 4 x slots
    config.flush_seconds = 30.0  # results reach disk at least this often
    # CPU hosts: split the cores into this many XLA devices, each attacking its own
    # images (0 = one per core, up to 8; docs/benchmarks.md). Accelerators ignore it.
    config.cpu_devices = 0
    # Multi-host: call jax.distributed.initialize() (coordinator from the environment,
    # e.g. on Cloud TPU or SLURM); each host then attacks its own share of the items.
    config.distributed = False
    return config
