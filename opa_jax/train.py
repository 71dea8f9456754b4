"""Training the zoo's CIFAR-10 networks (the attacked models of Su, Vargas & Sakurai, Sec. 4).

`train_and_evaluate(config, workdir)` trains one architecture on a dataset
spec (`folder:PATH` or `tfds:cifar10`), checkpoints the training state every
`checkpoint_every` steps, resumes from `<workdir>/checkpoints` when present,
and finally evaluates and writes a self-describing model checkpoint to
`<workdir>/model` (see `opa_jax.models.checkpoint`). It runs in three
parts: `setup`, `train_loop` and `final_evaluation`. Around them:
`opa_jax.train_data` reads the splits and augments images,
`opa_jax.train_progress` logs the rate and ETA and judges `max_hours`, and
`opa_jax.models.model_card` describes the written model.

Resuming gives the same result as an uninterrupted run: the data order is a
function of (seed, epoch) and each step's random key is `fold_in(key(seed),
step)`, so nothing but the checkpointed state carries over between steps.

Steps are data-parallel: each batch is sharded over a `data` mesh axis of the
local devices (on a CPU host, one XLA device per core: `cpu_devices`), the
state is replicated, and XLA's partitioner sums the gradients and batch-norm
statistics across devices. Every random draw is a function of the step's key
and not of the sharding, so the result does not depend on the device count
beyond float rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import serialization
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from opa_jax import files, train_data
from opa_jax.config_identity import config_identity, differing_fields
from opa_jax.errors import InputError
from opa_jax.models import base, checkpoint, zoo
from opa_jax.train_progress import Clock, Progress

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("warmup_cosine", "one_cycle", "constant")
TRAIN_STATE_FILE = "train_state.msgpack"
# Config fields that may change between a run and its resumption without changing the result.
RESUME_FREE_FIELDS = (
    "stop_after_steps",
    "log_every",
    "checkpoint_every",
    "checkpoint_every_seconds",
    "eval_batch_size",
    "exact_test_data",
    "data_cache_dir",
    "save_dtype",
    "cpu_devices",
    "eval_every_epochs",
    "max_hours",
)
HISTORY_FILE = "history.jsonl"  # one line per periodic evaluation: the epochs-to-accuracy curve


class TrainState(train_state.TrainState):
    """flax's state (step, params, optimiser and its state), with batch-norm statistics."""

    batch_stats: Any  # {} for models without batch norm


# ----------------------------------------------------------------------------- optimisation


def make_schedule(config, total_steps: int, steps_per_epoch: int):
    peak = config.learning_rate
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    warmup = min(warmup, max(total_steps - 1, 0))
    if config.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=peak,
            warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1),
            end_value=0.0,
        )
    if config.schedule == "one_cycle":
        return optax.cosine_onecycle_schedule(
            transition_steps=max(total_steps, 1),
            peak_value=peak,
            pct_start=config.one_cycle_pct_start,
        )
    return optax.constant_schedule(peak)


def make_optimizer(config, schedule) -> optax.GradientTransformation:
    # Weight decay on kernels only: not on biases or batch-norm scales/offsets.
    decay_mask = lambda params: jax.tree_util.tree_map(lambda x: x.ndim > 1, params)
    if config.optimizer == "sgd":
        return optax.chain(
            optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
            optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov),
        )
    return optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask)


def _variables(params, batch_stats):
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def train_step(
    state: TrainState,
    images,
    labels,
    *,
    seed,
    augment_padding,
    label_smoothing,
    num_classes,
    train_size: tuple[int, int] | None = None,
):
    """One SGD step on a batch of uint8 images [B, H, W, 3] and int labels [B]; with
    `train_size` (height, width), the augmented images are resized to it (antialiased
    linear) before the model sees them: progressive resizing's early phases."""
    key = jax.random.fold_in(jax.random.key(seed), state.step)
    augment_key, dropout_key = jax.random.split(key)
    images = images.astype(jnp.float32)
    if augment_padding:
        keys = jax.random.split(augment_key, images.shape[0])
        augment = jax.vmap(train_data.augment_image, in_axes=(0, 0, None))
        images = augment(keys, images, augment_padding)
    if train_size is not None:
        shape = (images.shape[0], *train_size, images.shape[-1])
        images = jax.image.resize(images, shape, "linear", antialias=True)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            _variables(params, state.batch_stats),
            images,
            train=True,
            rngs={"dropout": dropout_key},
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()
        return loss, (logits, updates.get("batch_stats", {}))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics = {
        "loss_sum": loss * labels.shape[0],
        "correct": jnp.sum(jnp.argmax(logits, -1) == labels),
        "count": labels.shape[0],
    }
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), metrics


def eval_step(variables, images, labels, mask, *, module):
    """Correct predictions and example count on a padded batch (mask marks real examples)."""
    logits = module.apply(variables, images.astype(jnp.float32), train=False)
    correct = (jnp.argmax(logits, -1) == labels) & mask
    return jnp.sum(correct), jnp.sum(mask)


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """The config fields that define the optimiser and its schedule (hashable)."""

    optimizer: str
    learning_rate: float
    momentum: float
    nesterov: bool
    weight_decay: float
    schedule: str
    warmup_epochs: float
    one_cycle_pct_start: float

    @classmethod
    def from_config(cls, config) -> OptimizerSettings:
        return cls(**{field.name: config[field.name] for field in dataclasses.fields(cls)})


def data_mesh(batch_size: int, devices=None) -> Mesh:
    """A `data` mesh over the most local devices (all, on a CPU host split into one
    device per core) that divide the batch evenly."""
    devices = list(jax.local_devices() if devices is None else devices)
    count = max(n for n in range(1, len(devices) + 1) if batch_size % n == 0)
    return Mesh(np.asarray(devices[:count]), ("data",))


def replicate(tree, mesh: Mesh):
    """`tree` on every device of the mesh (the train state's placement)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


@functools.lru_cache(maxsize=8)
def make_train_step_fn(
    settings: OptimizerSettings, total_steps: int, steps_per_epoch: int, mesh: Mesh, **step_options
):
    """(jitted train step, optimiser, schedule); cached so that equal runs in one
    process (resumptions, tests, notebooks) compile once.

    The step takes a state replicated on `mesh` (`replicate`) and a batch that it
    shards over the `data` axis, and returns the state replicated.
    """
    schedule = make_schedule(settings, total_steps, steps_per_epoch)
    tx = make_optimizer(settings, schedule)
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    step_fn = jax.jit(
        functools.partial(train_step, **step_options),
        in_shardings=(replicated, sharded, sharded),
        out_shardings=replicated,
        donate_argnums=0,
    )
    return step_fn, tx, schedule


@functools.lru_cache(maxsize=8)
def make_eval_fn(module, mesh: Mesh):
    """The jitted eval step; its batch is sharded over the mesh's `data` axis."""
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(
        functools.partial(eval_step, module=module),
        in_shardings=(replicated, sharded, sharded, sharded),
        out_shardings=replicated,
    )


def evaluate(eval_fn, variables, images, labels, batch_size: int) -> dict[str, float]:
    """Accuracy over a whole split; the last batch is padded so shapes stay static."""
    correct, count = 0, 0
    for start in range(0, len(labels), batch_size):
        batch_images = images[start : start + batch_size]
        batch_labels = labels[start : start + batch_size]
        n = len(batch_labels)
        mask = np.arange(batch_size) < n
        if n < batch_size:
            batch_images = np.concatenate(
                [batch_images, np.zeros((batch_size - n, *images.shape[1:]), images.dtype)]
            )
            batch_labels = np.concatenate([batch_labels, np.zeros(batch_size - n, labels.dtype)])
        c, m = eval_fn(variables, batch_images, batch_labels, mask)
        correct += int(c)
        count += int(m)
    return {"accuracy": correct / max(count, 1), "correct": correct, "count": count}


# ----------------------------------------------------------------------------- checkpoints


def save_train_state(
    workdir: str,
    state: TrainState,
    config,
    train_seconds: float = 0.0,
    cpu: tuple[float, int] | None = None,
) -> None:
    """Atomically writes the training state (params, batch stats, optimizer state, step)
    and the training seconds spent to reach it, over every stop and resume; `cpu` is
    (process CPU seconds, the step they are counted from)."""
    directory = os.path.join(workdir, "checkpoints")
    os.makedirs(directory, exist_ok=True)
    identity = config_identity(config, RESUME_FREE_FIELDS)
    payload = {
        "state": serialization.to_state_dict(jax.device_get(state)),
        "fingerprint": json.dumps(identity, sort_keys=True),
        "train_seconds": float(train_seconds),
    }
    if cpu is not None:
        payload["cpu_seconds"], payload["cpu_from_step"] = float(cpu[0]), int(cpu[1])
    files.write_atomic(
        os.path.join(directory, TRAIN_STATE_FILE), serialization.msgpack_serialize(payload)
    )


def read_train_state(workdir: str, config) -> tuple[dict, float | None, tuple | None] | None:
    """The saved training state as a state dict, the training seconds it took and the
    (process CPU seconds, step they are counted from) (each None when written before
    they were kept), or None when the workdir has none.

    InputError when it is corrupt or was written by a run with a different config.
    """
    path = os.path.join(workdir, "checkpoints", TRAIN_STATE_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            payload = serialization.msgpack_restore(f.read())
        fingerprint = json.loads(payload["fingerprint"])
        state = payload["state"]
        state["params"]  # noqa: B018 - present in every training checkpoint
        train_seconds = payload.get("train_seconds")
        cpu = payload.get("cpu_seconds")
        cpu = None if cpu is None else (float(cpu), int(payload["cpu_from_step"]))
    except Exception as e:
        raise InputError(
            f"training checkpoint {path!r} is corrupt ({e}); delete it to start afresh"
        ) from e
    differing = differing_fields(fingerprint, config_identity(config, RESUME_FREE_FIELDS))
    if differing:
        raise InputError(
            f"workdir {workdir!r} holds a training checkpoint of a different run (config fields "
            f"{differing} differ); use a new --workdir, or the same config to resume"
        )
    return state, (None if train_seconds is None else float(train_seconds)), cpu


def restore_train_state(saved: dict, target: TrainState, what: str) -> TrainState:
    """`target` with the values of a saved state dict; InputError when they do not fit."""
    base.check_variables(saved["params"], target.params, what)
    try:
        state = serialization.from_state_dict(target, saved)
    except Exception as e:
        raise InputError(f"{what} does not fit this model ({e})") from e
    return jax.tree_util.tree_map(jnp.asarray, state)


# ----------------------------------------------------------------------------- the run


def _check_config(config) -> None:
    choices = {
        "optimizer": OPTIMIZERS,
        "schedule": SCHEDULES,
        "compute_dtype": tuple(COMPUTE_DTYPES),
        "save_dtype": tuple(checkpoint.WEIGHTS_DTYPES),
    }
    for field, allowed in choices.items():
        if config[field] not in allowed:
            raise InputError(f"config.{field}={config[field]!r}: expected one of {allowed}")
    if config.batch_size <= 0 or config.eval_batch_size <= 0:
        raise InputError("config.batch_size and config.eval_batch_size must be positive")
    if config.num_steps <= 0 and config.num_epochs <= 0:
        raise InputError("set config.num_steps or config.num_epochs to a positive number")
    if not isinstance(config.progressive_resizing, str):
        raise InputError(
            f"config.progressive_resizing={config.progressive_resizing!r}: expected a string "
            "such as '16:0.35,24:0.6' ('' = off)"
        )


def model_overrides(config) -> dict[str, Any]:
    """The model options set in `config.model_overrides` (unset placeholders are None)."""
    return {k: v for k, v in config.model_overrides.to_dict().items() if v is not None}


def _hashable(options: dict[str, Any]) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))


@functools.lru_cache(maxsize=8)
def _train_module(name: str, options: tuple, compute_dtype: str):
    """The module a train step applies, one object per (name, options, dtype): the train
    state holds its `apply`, a static part of the step's input, so runs of one config in
    one process (a resume, tests) reuse the compiled step instead of compiling it again."""
    return zoo.build(name, **dict(options), dtype=COMPUTE_DTYPES[compute_dtype])


def _exact_test_available(spec: str) -> bool:
    kind, _, path = spec.partition(":")
    return bool(spec) and (kind != "folder" or os.path.isdir(path))


def _check_resizable(module, image_shape, size: tuple[int, int], config) -> None:
    """InputError unless `module` takes images of `size` with the variables of its native
    `image_shape` (a fully convolutional network with global pooling does; one whose
    dense layer reads a flattened map, such as VGG16, does not)."""
    native = jax.tree_util.tree_map(lambda x: x.shape, base.variable_shapes(module, image_shape))
    try:
        resized = base.variable_shapes(module, (*size, image_shape[2]))
        resized = jax.tree_util.tree_map(lambda x: x.shape, resized)
    except Exception as e:  # a map pooled or convolved to nothing
        resized = f"an error: {e}"
    if resized != native:
        raise InputError(
            f"config.progressive_resizing={config.progressive_resizing!r}: model "
            f"{config.model!r} cannot train on {size[0]}x{size[1]} images with the weights "
            f"of its {image_shape[0]}x{image_shape[1]} ones (expected the same variable "
            "shapes at both sizes, as a fully convolutional network with global pooling has); "
            "set it to '' for this model"
        )


@dataclasses.dataclass
class Training:
    """Everything a training run needs, read and built before its first step."""

    state: TrainState  # initial, or restored from the workdir
    step_fn: Any  # (state, images, labels) -> (state, metrics), jitted, data-parallel on `mesh`
    # Progressive resizing's phases before the native one: (end step, (height, width), the
    # step function that resizes to it); empty when `config.progressive_resizing` is "".
    resized: tuple[tuple[int, tuple[int, int], Any], ...]
    eval_fn: Any  # (variables, images, labels, mask) -> (correct, count), jitted
    mesh: Mesh  # the devices the train step runs on, along its `data` axis
    schedule: optax.Schedule
    train_images: np.ndarray  # [N, H, W, 3] uint8
    train_labels: np.ndarray  # [N] int32
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]
    model_config: dict[str, Any]  # the `zoo.build` options, num_classes included
    steps_per_epoch: int
    total_steps: int
    train_seconds: float | None = None  # spent before the restored state (None: unknown)
    cpu: tuple[float, int] | None = None  # (CPU seconds, counted from step) before it

    def cost(self, start: int, stop: int) -> float:
        """Steps `start` to `stop` in native-size steps: a resized step counts as its share
        of the native pixels (the ETA's and `max_hours`' estimate of its time)."""
        total, begin = 0.0, start
        height, width = self.image_shape[:2]
        for end, (h, w), _ in self.resized:
            count = max(min(stop, end) - begin, 0)
            total += count * h * w / (height * width)
            begin += count
        return total + max(stop - begin, 0)


def _read_splits(config, image_shape):
    """The train and test splits in memory, (train images, train labels, test images,
    test labels, class names); InputError when the two splits' classes differ."""
    train_images, train_labels, class_names = train_data.load_split(
        config.dataset, config.train_split, image_shape, config.data_cache_dir
    )
    test_images, test_labels, test_classes = train_data.load_split(
        config.dataset, config.test_split, image_shape, config.data_cache_dir
    )
    if test_classes != class_names:
        raise InputError(
            f"dataset {config.dataset}: classes of {config.test_split!r} {test_classes} differ "
            f"from those of {config.train_split!r} {class_names}"
        )
    return train_images, train_labels, test_images, test_labels, class_names


def _step_functions(
    config, eval_module, image_shape, num_classes, total_steps, steps_per_epoch, mesh
):
    """(the train step, the optimiser, its schedule, progressive resizing's phases as
    `Training.resized` holds them); InputError when the model cannot be resized."""
    step_options = dict(
        seed=config.seed,
        augment_padding=config.crop_padding if config.augment else 0,
        label_smoothing=config.label_smoothing,
        num_classes=num_classes,
    )
    settings = OptimizerSettings.from_config(config)
    step_fn, tx, schedule = make_train_step_fn(
        settings, total_steps, steps_per_epoch, mesh, **step_options
    )
    resized = []
    phases = train_data.resizing_phases(config.progressive_resizing, image_shape, total_steps)
    for end, size in phases:
        _check_resizable(eval_module, image_shape, size, config)
        resized_fn, _, _ = make_train_step_fn(
            settings, total_steps, steps_per_epoch, mesh, train_size=size, **step_options
        )
        resized.append((end, size, resized_fn))
    return step_fn, tx, schedule, tuple(resized)


def setup(config: ml_collections.ConfigDict, workdir: str) -> Training:
    """Checks the config, reads the data, builds the model and optimiser, and restores
    the training state when the workdir holds one (refused if from another config)."""
    _check_config(config)
    arch = zoo.get_architecture(config.model)
    overrides = model_overrides(config)
    zoo.build(config.model, **overrides)  # unknown options fail before any data is read
    image_shape = tuple(arch.image_shape)
    os.makedirs(workdir, exist_ok=True)
    saved = read_train_state(workdir, config)  # before reading data: a mismatch fails fast

    train_images, train_labels, test_images, test_labels, class_names = _read_splits(
        config, image_shape
    )
    num_classes = len(class_names)
    model_config = {**overrides, "num_classes": num_classes}
    module = _train_module(config.model, _hashable(model_config), config.compute_dtype)
    eval_module = zoo.build(config.model, **model_config)  # float32, as attacks load it

    num_train = len(train_labels)
    steps_per_epoch = num_train // config.batch_size
    if steps_per_epoch == 0:
        raise InputError(
            f"dataset {config.dataset}: {num_train} training images, fewer than one batch "
            f"(batch_size={config.batch_size})"
        )
    total_steps = config.num_steps if config.num_steps > 0 else config.num_epochs * steps_per_epoch
    mesh = data_mesh(config.batch_size)
    step_fn, tx, schedule, resized = _step_functions(
        config, eval_module, image_shape, num_classes, total_steps, steps_per_epoch, mesh
    )

    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=2, default=str)

    variables = base.init_variables(eval_module, jax.random.key(config.seed), image_shape)
    params = variables["params"]
    state = TrainState(
        step=jnp.asarray(0, jnp.int32),
        apply_fn=module.apply,
        params=params,
        tx=tx,
        opt_state=tx.init(params),
        batch_stats=variables.get("batch_stats", {}),
    )
    train_seconds, cpu = 0.0, (0.0, 0)
    if saved is not None:
        saved, train_seconds, cpu = saved
        state = restore_train_state(saved, state, f"training checkpoint in {workdir!r}")
        logging.info("resumed from %s at step %d", workdir, int(state.step))
    state = replicate(state, mesh)
    logging.info(
        "%s (%d parameters) on %s: %d train / %d test images, %d steps of %d (%d per epoch) "
        "on %d devices",
        config.model,
        base.count_params(variables),
        config.dataset,
        num_train,
        len(test_labels),
        total_steps,
        config.batch_size,
        steps_per_epoch,
        mesh.size,
    )
    return Training(
        state=state,
        step_fn=step_fn,
        resized=resized,
        eval_fn=make_eval_fn(eval_module, data_mesh(config.eval_batch_size)),
        mesh=mesh,
        schedule=schedule,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        class_names=class_names,
        image_shape=image_shape,
        model_config=model_config,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        train_seconds=train_seconds,
        cpu=cpu,
    )


def read_history(workdir: str, up_to_step: int | None = None) -> list[dict]:
    """The periodic evaluations in `<workdir>/history.jsonl`, those after `up_to_step`
    (written after the last checkpoint of a killed run) left out."""
    path = os.path.join(workdir, HISTORY_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if up_to_step is None or r["step"] <= up_to_step]


def _write_history(workdir: str, records: list[dict]) -> None:
    lines = "".join(json.dumps(record) + "\n" for record in records)
    files.write_atomic(os.path.join(workdir, HISTORY_FILE), lines)


def periodic_evaluation(
    config, training: Training, state: TrainState, step: int, train_metrics: dict, clock: Clock
) -> dict:
    """Test-split accuracy of the current weights, as one line of the history."""
    variables = jax.device_get(_variables(state.params, state.batch_stats))
    test = evaluate(
        training.eval_fn,
        variables,
        training.test_images,
        training.test_labels,
        config.eval_batch_size,
    )
    record = {
        "step": step,
        "epoch": round(step / training.steps_per_epoch, 4),
        "train_seconds": round(clock.wall(), 1),
        "train_cpu_seconds": round(clock.cpu()[0], 1),
        "test_accuracy": test["accuracy"],
        **{f"train_{name}": value for name, value in train_metrics.items()},
    }
    logging.info(
        "epoch %.2f (step %d): test accuracy %.4f (%d/%d) after %.0fs of training",
        record["epoch"],
        step,
        test["accuracy"],
        test["correct"],
        test["count"],
        record["train_seconds"],
    )
    return record


MAX_STEPS_IN_FLIGHT = 2  # train steps dispatched ahead of the one the device has finished


class _TermSignal:
    """Within it, SIGTERM asks the training loop to checkpoint and stop after the step it
    is in, instead of ending the process (main thread only; elsewhere SIGTERM keeps its
    default)."""

    def __enter__(self):
        self.received, self._installed = False, False
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        except ValueError:  # not the main thread
            pass
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.received = True

    def __exit__(self, *exc_info):
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)


def _history_and_clock(config, workdir: str, training: Training, step: int):
    """The periodic evaluations up to the restored `step` (newer ones, written after the
    last checkpoint of a killed run, are dropped from `history.jsonl`), the steps between
    evaluations (0: none), and the clock of the training seconds spent before."""
    history = read_history(workdir, up_to_step=step)
    if len(history) != len(read_history(workdir)):
        _write_history(workdir, history)
    eval_every = 0
    if config.eval_every_epochs > 0:
        eval_every = max(round(config.eval_every_epochs * training.steps_per_epoch), 1)
    seconds_before = training.train_seconds
    if seconds_before is None:  # a checkpoint from before they were kept: the last evaluation's
        seconds_before = history[-1]["train_seconds"] if history else 0.0
    # CPU seconds are counted from the first step run by a version that kept them.
    cpu_before, cpu_from_step = training.cpu if training.cpu is not None else (0.0, step)
    return history, eval_every, Clock(seconds_before, cpu_before, cpu_from_step)


def _mean_metrics(pending: list[dict]) -> dict[str, float]:
    """The train loss and accuracy over the steps of `pending` (their metrics on device)."""
    totals = jax.device_get(jax.tree_util.tree_map(lambda *x: sum(x), *pending))
    return {
        "loss": float(totals["loss_sum"] / totals["count"]),
        "accuracy": float(totals["correct"] / totals["count"]),
    }


def _stop_reason(config, step: int, term: _TermSignal | None, progress: Progress) -> str:
    """Why the loop stops after `step` before the end ('' when it goes on)."""
    if term is not None and term.received:
        return "SIGTERM"
    if progress.over_time:
        return "max_hours"
    if 0 < config.stop_after_steps <= step:
        return "stop_after_steps"
    return ""


def train_loop(
    config, workdir: str, training: Training, term: _TermSignal | None = None
) -> tuple[TrainState, dict, str, Clock]:
    """Steps from the restored step to the end (or `stop_after_steps`, a SIGTERM, or
    early log lines that project the run past `max_hours`: see `opa_jax.train_progress`),
    logging, evaluating every `eval_every_epochs` (into `history.jsonl`) and
    checkpointing every `checkpoint_every` steps and `checkpoint_every_seconds` on the
    way; returns the state, the last logged train metrics, why it stopped early ('' when
    it ran to the end) and the clock of the training seconds spent in all."""
    state, total_steps = training.state, training.total_steps
    step = int(state.step)
    history, eval_every, clock = _history_and_clock(config, workdir, training, step)
    progress = Progress(
        step=step,
        total_steps=total_steps,
        steps_per_epoch=training.steps_per_epoch,
        batch_size=config.batch_size,
        eval_every=eval_every,
        cost=training.cost,
        max_hours=config.max_hours,
        checkpoint_every_seconds=config.checkpoint_every_seconds,
    )
    pending = []  # metrics since the last log line, left on device until then
    order, order_epoch = None, -1
    train_metrics = {}
    while step < total_steps:
        epoch, position = divmod(step, training.steps_per_epoch)
        if epoch != order_epoch:
            num_train = len(training.train_labels)
            order = train_data.epoch_permutation(config.seed, epoch, num_train)
            order_epoch = epoch
        batch = order[position * config.batch_size : (position + 1) * config.batch_size]
        step_fn = next((fn for end, _, fn in training.resized if step < end), training.step_fn)
        state, metrics = step_fn(state, training.train_images[batch], training.train_labels[batch])
        pending.append(metrics)
        step += 1
        progress(step, metrics)
        # Dispatch is asynchronous: unchecked, this loop would run up to `log_every` steps
        # ahead of the device, and a SIGTERM or checkpoint would wait for all of them
        # (minutes of CPU steps). Two in flight keep the device as busy.
        if len(pending) >= MAX_STEPS_IN_FLIGHT:
            jax.block_until_ready(pending[-MAX_STEPS_IN_FLIGHT])
        if step % config.log_every == 0 or step == total_steps:
            train_metrics, pending = _mean_metrics(pending), []
            progress.report(step, train_metrics, float(training.schedule(step - 1)))
        if eval_every and step % eval_every == 0 and step < total_steps:
            with progress.timed("evaluation"):
                record = periodic_evaluation(config, training, state, step, train_metrics, clock)
                history.append(record)
                _write_history(workdir, history)
        stopping = _stop_reason(config, step, term, progress)
        due = step % config.checkpoint_every == 0 or step == total_steps or stopping
        if due or progress.checkpoint_due():
            with progress.timed("checkpoint"):
                save_train_state(workdir, state, config, clock.wall(), clock.cpu())
        if stopping and step < total_steps:
            logging.info("stopping after step %d (%s); resume to continue", step, stopping)
            return state, train_metrics, stopping, clock
    return state, train_metrics, "", clock


def stored_variables(variables, weights_dtype: str):
    """`variables` as a checkpoint stores them and a load returns them: floating leaves
    cast to `weights_dtype` and back to their own dtype."""
    dtype = checkpoint.WEIGHTS_DTYPES[weights_dtype]

    def round_trip(x):
        x = np.asarray(x)
        return x.astype(dtype).astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree_util.tree_map(round_trip, variables)


def final_evaluation(config, training: Training, variables) -> dict[str, dict]:
    """Accuracies on the test split and, when available, on the exact test images."""
    accuracies = {
        "test": {
            "dataset": config.dataset,
            "split": config.test_split,
            **evaluate(
                training.eval_fn,
                variables,
                training.test_images,
                training.test_labels,
                config.eval_batch_size,
            ),
        }
    }
    if _exact_test_available(config.exact_test_data):
        exact_images, exact_labels, exact_classes = train_data.load_split(
            config.exact_test_data, "test", training.image_shape
        )
        if exact_classes != training.class_names:
            logging.warning(
                "skipping %s: its classes %s differ from the training classes %s",
                config.exact_test_data,
                exact_classes,
                training.class_names,
            )
        else:
            accuracies["exact_test"] = {
                "dataset": config.exact_test_data,
                "split": "test",
                **evaluate(
                    training.eval_fn, variables, exact_images, exact_labels, config.eval_batch_size
                ),
            }
    for name, result in accuracies.items():
        logging.info(
            "%s accuracy on %s: %.4f (%d/%d)",
            name,
            result["dataset"],
            result["accuracy"],
            result["correct"],
            result["count"],
        )
    return accuracies


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains `config.model` on `config.dataset`; returns the accuracies and final variables.

    Writes `<workdir>/checkpoints/` (resumable training state), `<workdir>/config.json`
    and, at the end, the model checkpoint `<workdir>/model/`.
    """
    training = setup(config, workdir)
    with _TermSignal() as term:
        state, train_metrics, stopped, clock = train_loop(config, workdir, training, term)
    variables = jax.device_get(_variables(state.params, state.batch_stats))
    if stopped:
        return {
            "step": int(state.step),
            "stopped": True,
            "stop_reason": stopped,
            "variables": variables,
        }
    # The accuracies of the weights as stored (float16 by the CPU recipes), which are the
    # ones a load returns; those of the float32 weights beside them when they differ.
    stored = stored_variables(variables, config.save_dtype)
    accuracies = final_evaluation(config, training, stored)
    extra = {}
    if config.save_dtype != "float32":
        logging.info("the float32 weights, before the cast to %s:", config.save_dtype)
        extra["accuracies_float32"] = final_evaluation(config, training, variables)
    cpu_seconds, cpu_from_step = clock.cpu()
    checkpoint.save_model_checkpoint(
        os.path.join(workdir, "model"),
        config.model,
        variables,
        {
            "model_config": training.model_config,
            "class_names": training.class_names,
            "image_shape": training.image_shape,
            "dataset": config.dataset,
            "accuracies": accuracies,
            "final_train_metrics": train_metrics,
            "steps": training.total_steps,
            "epochs": round(training.total_steps / training.steps_per_epoch, 4),
            "seed": config.seed,
            "train_config": config.to_dict(),
            "train_time_s": round(clock.wall(), 1),
            "train_cpu_s": round(cpu_seconds, 1),
            "train_cpu_from_step": cpu_from_step,
            "history": read_history(workdir),
            "devices": [str(d) for d in training.mesh.devices.flat],
            "command": " ".join(sys.argv),
            **extra,
        },
        weights_dtype=config.save_dtype,
    )
    logging.info("wrote %s", os.path.join(workdir, "model"))
    return {
        "step": int(state.step),
        "stopped": False,
        "accuracies": accuracies,
        "train_metrics": train_metrics,
        "variables": stored,
    }
