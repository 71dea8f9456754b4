"""How fast the zoo's networks train on this host (issue 15).

`measure(name, ...)` times, in one process and interleaved round by round, the
eval forward pass and a whole train step (`opa_jax.train`'s, with augmentation,
dropout, batch norm and the SGD update) of one architecture at full width:
with the plain lax operations (`fast_gradients=False`: XLA's own gradients)
and with `opa_jax.models.fast_ops`, on meshes of 1, 2, ... devices. Each
figure is the fastest of the rounds, per image. `markdown` renders the rows;
`benchmark(config, out)` measures each configured model and writes both.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from opa_jax import train
from opa_jax.errors import InputError
from opa_jax.models import base, zoo

# The recipe of configs/train_default.py (its optimiser costs little beside the network).
SETTINGS = train.OptimizerSettings(
    optimizer="sgd",
    learning_rate=0.1,
    momentum=0.9,
    nesterov=True,
    weight_decay=5e-4,
    schedule="warmup_cosine",
    warmup_epochs=2.0,
    one_cycle_pct_start=0.25,
)
EPOCH_IMAGES = 50_000  # the CIFAR-10 training set


def make_forward(module, mesh: Mesh):
    """The eval forward pass (batch-norm running statistics), batch sharded on `mesh`."""
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    forward = lambda variables, images: module.apply(variables, images, train=False)
    return jax.jit(forward, in_shardings=(replicated, sharded), out_shardings=sharded)


def make_train_step(name: str, mesh: Mesh, fast_gradients: bool, width: float = 1.0):
    """`step(state, images, labels) -> (state, metrics)` of `opa_jax.train`, its
    initial state replicated on `mesh`, and the initial variables."""
    arch = zoo.get_architecture(name)
    module = zoo.build(name, fast_gradients=fast_gradients, width=width)
    step_fn, tx, _ = train.make_train_step_fn(
        SETTINGS, 1000, 100, mesh,
        seed=0, augment_padding=4, label_smoothing=0.0, num_classes=arch.num_classes,
    )  # fmt: skip
    variables = base.init_variables(module, jax.random.key(0), arch.image_shape)
    state = train.TrainState.create(
        apply_fn=module.apply,
        params=variables["params"],
        tx=tx,
        batch_stats=variables.get("batch_stats", {}),
    )
    return step_fn, train.replicate(state, mesh), variables


def _seconds(fn) -> float:
    started = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - started


def measure(name: str, batch_size: int = 128, device_counts=(1, 2), rounds: int = 3,
            width: float = 1.0, log=print) -> list[dict]:  # fmt: skip
    """Per device count: seconds per image of the eval forward and of the plain and
    fast train steps, their ratios, and hours per epoch of `EPOCH_IMAGES` images
    (`width` < 1 only for tests)."""
    arch = zoo.get_architecture(name)
    rng = np.random.default_rng(0)
    host_images = rng.integers(0, 256, (batch_size, *arch.image_shape), dtype=np.uint8)
    host_labels = rng.integers(0, arch.num_classes, batch_size, dtype=np.int32)
    timers = {}  # (devices, what) -> a function timing one call
    for count in device_counts:
        mesh = Mesh(np.asarray(jax.local_devices()[:count]), ("data",))
        sharded = NamedSharding(mesh, P("data"))
        images, labels = jax.device_put((host_images, host_labels), sharded)
        float_images = jax.device_put(host_images.astype(np.float32), sharded)
        for fast in (False, True):
            step_fn, state, variables = make_train_step(name, mesh, fast, width)
            box = {"state": state}

            def step_once(step_fn=step_fn, box=box, images=images, labels=labels):
                box["state"], metrics = step_fn(box["state"], images, labels)
                return metrics

            timers[count, "fast_step" if fast else "plain_step"] = step_once
        forward = make_forward(zoo.build(name, width=width), mesh)
        variables = train.replicate(variables, mesh)
        timers[count, "forward"] = lambda f=forward, v=variables, x=float_images: f(v, x)
    for key, fn in timers.items():  # compile and warm up
        started = time.perf_counter()
        jax.block_until_ready(fn())
        log(f"{name} {key[1]} on {key[0]} devices: first call {time.perf_counter() - started:.1f}s")
    times = {key: [] for key in timers}
    for round_index in range(rounds):
        for key, fn in timers.items():
            times[key].append(_seconds(fn))
        log(f"{name} round {round_index + 1}/{rounds}: "
            + ", ".join(f"{k[1]}@{k[0]} {v[-1]:.2f}s" for k, v in times.items()))  # fmt: skip
    rows = []
    for count in device_counts:
        per_image = {what: min(times[count, what]) / batch_size
                     for what in ("forward", "plain_step", "fast_step")}  # fmt: skip
        rows.append({
            "model": name,
            "devices": count,
            "batch_size": batch_size,
            "forward_s_per_image": per_image["forward"],
            "plain_step_s_per_image": per_image["plain_step"],
            "fast_step_s_per_image": per_image["fast_step"],
            "plain_ratio": per_image["plain_step"] / per_image["forward"],
            "fast_ratio": per_image["fast_step"] / per_image["forward"],
            "plain_hours_per_epoch": per_image["plain_step"] * EPOCH_IMAGES / 3600,
            "fast_hours_per_epoch": per_image["fast_step"] * EPOCH_IMAGES / 3600,
            "fast_images_per_s": 1 / per_image["fast_step"],
            "seconds": {what: times[count, what] for what in per_image},
        })  # fmt: skip
    return rows


def host_record() -> dict:
    """What the figures depend on: versions, devices, cores and the machine's load."""
    return {
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.local_devices()],
        "cores": len(os.sched_getaffinity(0)),
        "load_average": os.getloadavg(),
    }


def markdown(rows: list[dict]) -> str:
    """One table: per model and device count, the forward and train step per image."""
    lines = [
        "| model | devices | forward ms/image | train step ms/image, plain / fast | "
        "step / forward, plain / fast | images/s (fast) | hours per epoch, plain / fast |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['devices']} | {1e3 * row['forward_s_per_image']:.2f} "
            f"| {1e3 * row['plain_step_s_per_image']:.1f} "
            f"/ {1e3 * row['fast_step_s_per_image']:.1f} "
            f"| {row['plain_ratio']:.1f} / {row['fast_ratio']:.1f} "
            f"| {row['fast_images_per_s']:.0f} "
            f"| {row['plain_hours_per_epoch']:.2f} / {row['fast_hours_per_epoch']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def benchmark(config, out: str, log=print) -> str:
    """`measure` for each of `config.models`; writes `<out>/train_speed.json` and
    `<out>/train_speed.md` and returns the Markdown table."""
    available = len(jax.local_devices())
    counts = tuple(config.device_counts)
    if not counts or min(counts) < 1 or max(counts) > available:
        raise InputError(
            f"config.device_counts={counts}: expected counts from 1 to the {available} local "
            "devices (on a CPU, raise config.cpu_devices)"
        )
    if any(config.batch_size % count for count in counts):
        raise InputError(f"config.batch_size={config.batch_size}: not divisible by {counts}")
    for name in config.models:
        zoo.get_architecture(name)  # an unknown name fails before any measurement
    host = host_record()
    rows = []
    for name in config.models:
        rows += measure(name, config.batch_size, counts, config.rounds, config.width, log=log)
    host["load_average_after"] = os.getloadavg()
    table = markdown(rows)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "train_speed.json"), "w") as f:
        json.dump({"config": config.to_dict(), "host": host, "rows": rows}, f, indent=2)
    with open(os.path.join(out, "train_speed.md"), "w") as f:
        f.write(table)
    return table
