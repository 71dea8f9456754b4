"""The devices an attack runs on, and how many images each holds in flight.

A CPU host is split into one XLA device per core (`set_cpu_devices`), so that
each core runs its own attack loop on its own images, as GPUs do. The number
of in-flight images per device (`auto_slots`) comes from the device's memory
and XLA's memory analysis of the model. docs/benchmarks.md measures both.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
from absl import logging

from opa_jax import incremental
from opa_jax.errors import InputError
from opa_jax.models import LoadedModel

# `cpu_devices=0` gives one CPU device per usable core, up to this many.
MAX_AUTO_CPU_DEVICES = 8
# A batch of about this many images per CPU device keeps its core busy.
CPU_BATCH_PER_DEVICE = 400
_FORCE_FLAG = "--xla_force_host_platform_device_count"


def set_cpu_devices(count: int) -> None:
    """Splits the host CPU into `count` XLA devices; call it before JAX starts.

    XLA runs a convolution of one device on about one thread, so a single
    device leaves cores idle; several devices attack several images' models
    at once. Results do not depend on the count.

    `count=0` (auto) is one device per usable core, at most
    `MAX_AUTO_CPU_DEVICES`, unless XLA_FLAGS already sets
    `--xla_force_host_platform_device_count` (then that count stands). It
    only concerns the CPU backend: accelerators keep their own devices.
    """
    if count < 0:
        raise InputError(f"cpu_devices={count}: expected >= 0 (0 = one per core)")
    if count == 0:
        if _FORCE_FLAG in os.environ.get("XLA_FLAGS", ""):
            return
        count = max(1, min(len(os.sched_getaffinity(0)), MAX_AUTO_CPU_DEVICES))
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # JAX already started in this process: the count stays
        logging.warning("cpu_devices=%d not applied: JAX's backends are already running", count)


def forward_temp_bytes(model: LoadedModel, batch: int) -> int | None:
    """Temporary bytes of the model's forward pass at `batch` images (XLA's memory
    analysis), or None where the backend gives no analysis."""
    images = jax.ShapeDtypeStruct((batch, *model.image_shape), np.float32)
    analysis = jax.jit(model.apply_fn).lower(model.params, images).compile().memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def incremental_temp_bytes(model: LoadedModel, evaluator, popsize: int) -> int | None:
    """Temporary bytes of the incremental pass over one image's `popsize` candidates
    (XLA's memory analysis), or None where the backend gives no analysis."""
    h, w, c = model.image_shape
    images = jax.ShapeDtypeStruct((1, h, w, c), np.float32)
    candidates = jax.ShapeDtypeStruct((1, popsize, 5 * evaluator.program.num_pixels), np.float32)
    activations = jax.eval_shape(evaluator.activations, model.params, images)
    logits = functools.partial(evaluator.logits, round_rgb=True)
    compiled = jax.jit(logits).lower(model.params, activations, images, candidates).compile()
    analysis = compiled.memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def slot_bytes(model: LoadedModel, popsize: int, evaluator=None) -> int:
    """Device memory one in-flight image costs: the evaluation's scratch at batch
    `popsize` plus its perturbed batch, twice, and the image's activation cache
    under the incremental evaluator (`evaluator`, default: full forward passes).

    On the CPU, the whole loop's memory per slot matches this closely
    (docs/benchmarks.md). Without an analysis it falls back to 64 perturbed
    batches.
    """
    h, w, c = model.image_shape
    batch_bytes = popsize * h * w * c * 4
    program = getattr(evaluator, "program", None)
    cache = incremental.cache_bytes(program) if program is not None else 0
    try:
        if program is None:
            temp_bytes = forward_temp_bytes(model, popsize)
        else:
            temp_bytes = incremental_temp_bytes(model, evaluator, popsize)
    except Exception:  # noqa: BLE001 - memory analysis is optional per backend
        temp_bytes = None
    if temp_bytes is None:
        return 64 * batch_bytes + cache
    return int(temp_bytes + 2 * batch_bytes + cache)


def host_available_bytes() -> int:
    """The host memory available to new allocations (Linux `MemAvailable`), or 0 if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return 0


def auto_slots(model: LoadedModel, popsize: int, evaluator=None) -> int:
    """In-flight images per device: enough images per model call to fill the device.

    On the CPU, each core is its own device (`set_cpu_devices`), and a batch
    of about `CPU_BATCH_PER_DEVICE` images per device is fastest
    (docs/benchmarks.md); with more than one slot per device (small
    populations), the slots of all devices fit in half the available host
    memory. On accelerators, half the free memory is filled with slots of
    `slot_bytes` (of `evaluator`, which counts the activation cache).
    """
    device = jax.local_devices()[0]
    if device.platform == "cpu":
        slots = max(1, CPU_BATCH_PER_DEVICE // popsize)
        available = host_available_bytes()
        if slots > 1 and available:  # the devices share the host's memory: half of it at most
            budget = 0.5 * available / len(jax.local_devices())
            per_slot = slot_bytes(model, popsize, evaluator)
            slots = int(max(1, min(slots, budget // max(per_slot, 1))))
        return slots
    try:
        stats = device.memory_stats() or {}
        free = stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)
    except Exception:  # noqa: BLE001 - memory_stats is optional per backend
        free = 0
    if free <= 0:
        return max(1, 65536 // popsize)
    per_slot = slot_bytes(model, popsize, evaluator)
    return int(max(1, min(256, 0.5 * free // max(per_slot, 1))))


def slots_and_chunk(
    config, model: LoadedModel, popsize: int, num_items: int, evaluator=None
) -> tuple[int, int]:
    """In-flight images and queue items per device for a run of `num_items` work items:
    `config.slots` and `config.chunk_size`, or chosen when 0."""
    per_device_items = max(1, -(-num_items // len(jax.local_devices())))
    slots = config.slots or min(auto_slots(model, popsize, evaluator), per_device_items)
    return slots, config.chunk_size or 4 * slots
