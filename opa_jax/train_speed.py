"""How fast the zoo's networks train on this host (issue 15).

`measure(name, ...)` times, in one process and interleaved round by round, the
eval forward pass and a whole train step (`opa_jax.train`'s, with augmentation,
dropout, batch norm and the SGD update) of one architecture at full width:
with the plain lax operations (`fast_gradients=False`: XLA's own gradients)
and with the fast ones of `opa_jax.models.layers`, on meshes of 1, 2, ...
devices. Each figure is the fastest of the rounds, per image, cells reading
"plain / fast". `markdown` renders the rows; `benchmark(config, out)`
measures each configured model and writes both.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
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


def make_train_step(
    name: str,
    mesh: Mesh,
    fast_gradients: bool,
    width: float = 1.0,
    train_size: tuple[int, int] | None = None,
):
    """`step(state, images, labels) -> (state, metrics)` of `opa_jax.train`, its
    initial state replicated on `mesh`, and the initial variables; with `train_size`,
    the step of progressive resizing's phase at that (height, width)."""
    arch = zoo.get_architecture(name)
    module = zoo.build(name, fast_gradients=fast_gradients, width=width)
    step_fn, tx, _ = train.make_train_step_fn(
        SETTINGS,
        1000,
        100,
        mesh,
        seed=0,
        augment_padding=4,
        label_smoothing=0.0,
        num_classes=arch.num_classes,
        train_size=train_size,
    )
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


def measure(
    name: str,
    batch_size: int = 128,
    device_counts=(1, 2),
    rounds: int = 3,
    width: float = 1.0,
    log=print,
) -> list[dict]:
    """Per device count: seconds per image of the eval forward and of the train step,
    with the plain and with the fast operations, the step's ratio to the forward of
    the same operations, and hours per epoch of `EPOCH_IMAGES` images (`width` < 1
    only for tests)."""
    arch = zoo.get_architecture(name)
    rng = np.random.default_rng(0)
    host_images = rng.integers(0, 256, (batch_size, *arch.image_shape), dtype=np.uint8)
    host_labels = rng.integers(0, arch.num_classes, batch_size, dtype=np.int32)
    timers = {}  # (devices, "plain" | "fast", "forward" | "step") -> one call, waited for
    for count in device_counts:
        mesh = Mesh(np.asarray(jax.local_devices()[:count]), ("data",))
        sharded = NamedSharding(mesh, P("data"))
        images, labels = jax.device_put((host_images, host_labels), sharded)
        float_images = jax.device_put(host_images.astype(np.float32), sharded)
        for ops in ("plain", "fast"):
            step_fn, state, variables = make_train_step(name, mesh, ops == "fast", width)
            forward = make_forward(zoo.build(name, width=width, fast_gradients=ops == "fast"), mesh)
            variables = train.replicate(jax.tree.map(jnp.copy, variables), mesh)  # state is donated
            box = {"state": state}

            def step_once(step_fn=step_fn, box=box, images=images, labels=labels):
                box["state"], metrics = step_fn(box["state"], images, labels)
                return metrics

            timers[count, ops, "step"] = step_once
            timers[count, ops, "forward"] = lambda f=forward, v=variables, x=float_images: f(v, x)
    for key, fn in timers.items():  # compile and warm up
        started = time.perf_counter()
        jax.block_until_ready(fn())
        log(f"{name} {key}: first call {time.perf_counter() - started:.1f}s")
    times = {key: [] for key in timers}
    for round_index in range(rounds):
        for key, fn in timers.items():
            times[key].append(_seconds(fn))
        log(
            f"{name} round {round_index + 1}/{rounds}: "
            + ", ".join(f"{key} {values[-1]:.2f}s" for key, values in times.items())
        )
    rows = []
    for count in device_counts:
        row = {"model": name, "devices": count, "batch_size": batch_size, "width": width}
        for ops in ("plain", "fast"):
            forward = min(times[count, ops, "forward"]) / batch_size
            step = min(times[count, ops, "step"]) / batch_size
            seconds = {what: times[count, ops, what] for what in ("forward", "step")}
            row |= {
                f"{ops}_forward_s_per_image": forward,
                f"{ops}_step_s_per_image": step,
                f"{ops}_ratio": step / forward,
                f"{ops}_images_per_s": 1 / step,
                f"{ops}_hours_per_epoch": step * EPOCH_IMAGES / 3600,
                f"{ops}_seconds": seconds,
            }
        rows.append(row)
    return rows


def measure_sizes(
    name: str, sizes, batch_size: int = 128, rounds: int = 3, width: float = 1.0, log=print
) -> list[dict]:
    """Progressive resizing's price list: the train step (fast operations, one device) at
    the native size and at each of `sizes` (heights; widths in the image's aspect ratio),
    timed in interleaved rounds, with each size's speed-up over the native step beside
    its share of the native pixels (the cost `opa_jax.train` assumes for its ETA)."""
    arch = zoo.get_architecture(name)
    height, width_px = arch.image_shape[:2]
    rng = np.random.default_rng(0)
    mesh = Mesh(np.asarray(jax.local_devices()[:1]), ("data",))
    images = rng.integers(0, 256, (batch_size, *arch.image_shape), dtype=np.uint8)
    labels = rng.integers(0, arch.num_classes, batch_size, dtype=np.int32)
    images, labels = jax.device_put((images, labels))
    shapes = [(height, width_px)] + [(s, max(round(s * width_px / height), 1)) for s in sizes]
    timers = {}
    for shape in shapes:
        size = None if shape == (height, width_px) else shape
        step_fn, state, _ = make_train_step(name, mesh, True, width, train_size=size)
        box = {"state": state}

        def step_once(step_fn=step_fn, box=box):
            box["state"], metrics = step_fn(box["state"], images, labels)
            return metrics

        jax.block_until_ready(step_once())  # compile and warm up
        timers[shape] = step_once
    times = {shape: [] for shape in shapes}
    for round_index in range(rounds):
        for shape, fn in timers.items():
            times[shape].append(_seconds(fn))
        log(
            f"{name} sizes, round {round_index + 1}/{rounds}: "
            + ", ".join(f"{h}x{w} {t[-1]:.2f}s" for (h, w), t in times.items())
        )
    native = min(times[shapes[0]])
    return [
        {
            "model": name,
            "height": h,
            "width": w,
            "batch_size": batch_size,
            "images_per_s": batch_size / min(times[h, w]),
            "speedup": native / min(times[h, w]),
            "pixel_share": h * w / (height * width_px),
            "seconds": times[h, w],
        }
        for h, w in shapes
    ]


def sizes_markdown(rows: list[dict]) -> str:
    """The table of `measure_sizes` rows."""
    lines = [
        "| model | train size | train images/s | speed-up over native | native pixels / pixels |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['height']}x{row['width']} | {row['images_per_s']:.0f} "
            f"| {row['speedup']:.2f}x | {1 / row['pixel_share']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def host_record() -> dict:
    """What the figures depend on: versions, devices, cores and the machine's load."""
    return {
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.local_devices()],
        "cores": len(os.sched_getaffinity(0)),
        "load_average": os.getloadavg(),
    }


def markdown(rows: list[dict]) -> str:
    """One table: per model and device count, the forward pass and the train step per
    image with the plain / the fast operations."""
    lines = [
        "| model | devices | eval forward, ms/image | train step, ms/image | step / forward "
        "| train images/s | hours per epoch |",
        "|---|---|---|---|---|---|---|",
    ]
    pair = lambda row, field, spec: (
        f"{row['plain_' + field]:{spec}} / {row['fast_' + field]:{spec}}"
    )
    for row in rows:
        ms = {
            ops: {what: 1e3 * row[f"{ops}_{what}_s_per_image"] for what in ("forward", "step")}
            for ops in ("plain", "fast")
        }
        lines.append(
            f"| {row['model']} | {row['devices']} "
            f"| {ms['plain']['forward']:.2f} / {ms['fast']['forward']:.2f} "
            f"| {ms['plain']['step']:.1f} / {ms['fast']['step']:.1f} "
            f"| {pair(row, 'ratio', '.1f')} | {pair(row, 'images_per_s', '.0f')} "
            f"| {pair(row, 'hours_per_epoch', '.2f')} |"
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
    sizes = tuple(config.train_sizes)
    arch_heights = {name: zoo.get_architecture(name).image_shape[0] for name in config.models}
    for name, height in arch_heights.items():
        if any(not 0 < s < height for s in sizes):
            raise InputError(
                f"config.train_sizes={sizes}: expected heights from 1 to {height - 1}, "
                f"below {name}'s native {height}"
            )
    rows, size_rows = [], []
    for name in config.models:
        rows += measure(name, config.batch_size, counts, config.rounds, config.width, log=log)
        if sizes:
            size_rows += measure_sizes(
                name, sizes, config.batch_size, config.rounds, config.width, log=log
            )
    host["load_average_after"] = os.getloadavg()
    table = markdown(rows)
    if size_rows:
        table += "\nProgressive resizing: the train step by image size\n\n" + sizes_markdown(
            size_rows
        )
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "train_speed.json"), "w") as f:
        record = {"config": config.to_dict(), "host": host, "rows": rows, "sizes": size_rows}
        json.dump(record, f, indent=2)
    with open(os.path.join(out, "train_speed.md"), "w") as f:
        f.write(table)
    return table
