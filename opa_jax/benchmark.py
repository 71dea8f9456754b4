"""Throughput of the attack engine against the model's forward ceiling and a per-image baseline.

`benchmark(config, workdir)` measures, in one process:

- the forward ceiling: model queries/s of the bare jitted forward pass at the
  engine's batch (slots * popsize images), after warm-up;
- the engine: queries/s and images/s of `attack.Attacker` at the configured DE
  settings with early stopping off, and images/s with it on (real images when
  the configured dataset fits the model);
- efficiency = engine queries/s / forward ceiling, with the lost time split
  into idle slots, DE mutation/selection, building the perturbed images, host
  work between device calls and the rest;
- SciPy's `differential_evolution` attacking one image at a time with the
  same jitted model, as the public Keras/PyTorch implementations do;
- scaling in slots, population, pixels, image size and device count, the
  bfloat16 forward pass, and device memory per in-flight image.

Every timed figure is repeated after a warm-up; repetitions of the ceiling, the
engine and the baseline are interleaved so that their ratios are taken over
the same stretch of a possibly shared machine. Ratios are computed per
repetition and summarised by their median and range.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from opa_jax import attack, de, engine, profiling
from opa_jax import data as data_lib
from opa_jax import run as run_lib
from opa_jax.models import LoadedModel, load_model

# ---------------------------------------------------------------------------
# Small helpers.


def spread(values) -> dict:
    """Median and range of repeated measurements (all values kept for the record)."""
    values = [float(v) for v in values]
    if not values:
        return {"median": None, "min": None, "max": None, "values": []}
    return {
        "median": float(np.median(values)),
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_info() -> dict:
    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    devices = jax.devices()
    return {
        "cpu_model": cpu_model,
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)),
        "load_average_at_start": list(os.getloadavg()),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in devices],
        "device_kind": devices[0].device_kind,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def de_config(config, **overrides) -> de.DEConfig:
    fields = {k: v for k, v in config.de.items() if k != "preset"}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return de.DEConfig.from_preset(config.de.preset, num_pixels=config.pixels, **fields)


def random_images(count: int, image_shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, *image_shape), dtype=np.uint8)


@dataclasses.dataclass
class Workload:
    """Images to attack with their true labels; `source` says where they came from."""

    images: np.ndarray  # [N, H, W, 3] uint8
    true_labels: np.ndarray  # [N] int32
    indices: np.ndarray  # [N] dataset index (keys the random stream)
    source: str

    def take(self, count: int) -> Workload:
        """The first `count` images; cycles (with fresh indices) when there are fewer."""
        if count <= len(self.images):
            return Workload(self.images[:count], self.true_labels[:count], self.indices[:count],
                            self.source)  # fmt: skip
        rows = np.arange(count) % len(self.images)
        return Workload(self.images[rows], self.true_labels[rows], np.arange(count), self.source)

    def items(self) -> attack.WorkItems:
        n = len(self.images)
        return attack.WorkItems(
            np.arange(n), self.indices, self.true_labels, np.full(n, -1, np.int32)
        )


def load_workload(model: LoadedModel, config, count: int) -> Workload:
    """The first `count` correctly classified images of `config.data` when it fits the model.

    Otherwise random images, labelled with the model's own prediction so that
    every attack starts from a correctly classified image.
    """
    if config.data:
        try:
            dataset = data_lib.load_dataset(config.data, config.split, model.image_shape)
        except Exception as e:  # noqa: BLE001 - fall back to random images, say why
            reason = f"{config.data} unavailable ({e})"
        else:
            if len(dataset.class_names) == model.num_classes:
                positions, batch = [], 64
                for start in range(0, len(dataset), batch):
                    chunk = np.arange(start, min(start + batch, len(dataset)))
                    try:
                        probs = attack.predict_probs(model, dataset.read(chunk))
                    except Exception as e:  # noqa: BLE001 - e.g. images of another size
                        reason = f"{config.data} does not fit the model ({e})"
                        break
                    correct = chunk[probs.argmax(-1) == dataset.labels[chunk]]
                    positions.extend(correct.tolist())
                    if len(positions) >= count:
                        positions = positions[:count]
                        return Workload(
                            dataset.read(positions),
                            dataset.labels[positions].astype(np.int32),
                            dataset.indices[positions],
                            f"{config.data} (first {count} correctly classified)",
                        )
                else:
                    reason = f"{config.data} has fewer than {count} correctly classified images"
            else:
                reason = f"{config.data} has {len(dataset.class_names)} classes"
    else:
        reason = "no dataset configured"
    images = random_images(count, model.image_shape, config.seed)
    labels = attack.predict_probs(model, images).argmax(-1).astype(np.int32)
    return Workload(images, labels, np.arange(count), f"random images ({reason})")


# ---------------------------------------------------------------------------
# Forward ceiling, engine runs and the per-image baseline.


class Forward:
    """The bare jitted forward pass at one batch size per device, on fixed random images.

    `time()` times one call. `time_loop()` times `loop_calls` forward passes
    inside one jitted loop, as the engine's loop calls the model: on the CPU
    a call's temporaries are allocated (and page-faulted) afresh on every
    call, while a loop reuses them, so the loop is the tighter ceiling there.
    Like the engine, it runs on every local device at once (`batch` images
    each), so that `queries` per call is `batch` x the device count.
    """

    def __init__(self, model: LoadedModel, batch: int, seed: int = 0, loop_calls: int = 0):
        self.model = model
        self.batch = batch
        self.loop_calls = loop_calls
        devices = jax.local_devices()
        self.queries = batch * len(devices)
        mesh = Mesh(np.asarray(devices), ("data",))
        sharded = NamedSharding(mesh, P("data"))
        self.params = jax.device_put(model.params, NamedSharding(mesh, P()))
        self.images = jax.device_put(
            random_images(self.queries, model.image_shape, seed).astype(np.float32), sharded
        )  # [devices * batch, H, W, 3]

        def per_device(fn):
            return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P("data")),
                                         out_specs=P("data"), check_vma=False))  # fmt: skip

        def loop(params, images):
            def body(i, carry):
                images, total = carry
                images = images.at[i % batch, 0, 0, 0].add(1.0)  # a new input every pass
                return images, total + jnp.sum(model.apply_fn(params, images))

            return jax.lax.fori_loop(0, loop_calls, body, (images, 0.0))[1][None]

        self.fn = per_device(model.apply_fn)
        self.loop = per_device(loop)
        jax.block_until_ready(self.fn(self.params, self.images))  # compile and warm up
        if loop_calls:  # compile only: its timed calls reuse their temporaries anyway
            self.loop.lower(self.params, self.images).compile()

    def _time(self, fn, calls: int) -> dict:
        started, cpu = time.perf_counter(), _cpu_seconds()
        jax.block_until_ready(fn(self.params, self.images))
        wall = time.perf_counter() - started
        return {"seconds": wall, "queries_per_s": calls * self.queries / wall,
                "cpu_seconds": _cpu_seconds() - cpu}  # fmt: skip

    def time(self) -> dict:
        return self._time(self.fn, 1)

    def time_loop(self) -> dict | None:
        return self._time(self.loop, self.loop_calls) if self.loop_calls else None


def digest(results: attack.Results) -> str:
    """A short hash of the per-image results in work-id order (equal runs give equal hashes)."""
    order = np.argsort(results.work_ids)
    h = hashlib.sha256()
    for array in (results.work_ids, results.success, results.perturbation, results.queries):
        h.update(np.ascontiguousarray(np.asarray(array)[order]).tobytes())
    return h.hexdigest()[:16]


def whole_chunk(num_images: int, num_devices: int) -> int:
    """Queue items per device that hold `num_images` in one device call: `run_engine`'s default."""
    return max(1, -(-num_images // num_devices))


def run_engine(model, config: de.DEConfig, slots: int, workload: Workload, seed: int = 0,
               devices=None, chunk: int | None = None) -> dict:  # fmt: skip
    """One timed attack of the whole workload through `attack.Attacker`.

    The queue holds `chunk` items per device (default: the whole workload), so
    a warm-up on one image with the same `chunk` compiles the same loop.
    Device calls are timed by blocking on their outputs, so `host_seconds`
    (wall time outside them) is the per-call host work: reading images,
    building and sending the queue, fetching and decoding results.
    """
    attacker = attack.Attacker(model, config, False, slots, devices)
    device_seconds, calls = [0.0], [0]
    run_queue = attacker._run_queue

    def timed_run_queue(*args):
        started = time.perf_counter()
        out = jax.block_until_ready(run_queue(*args))
        device_seconds[0] += time.perf_counter() - started
        calls[0] += 1
        return out

    attacker._run_queue = timed_run_queue
    progress = attack.Progress()
    num_devices = len(attacker.devices)
    chunk = chunk or whole_chunk(len(workload.images), num_devices)
    started, cpu = time.perf_counter(), _cpu_seconds()
    chunks = list(attacker.run(jax.random.key(seed), workload.items(),
                               lambda p: workload.images[p], chunk, progress))  # fmt: skip
    wall = time.perf_counter() - started
    results = attack.Results(*[np.concatenate([getattr(c, f.name) for c in chunks])
                               for f in dataclasses.fields(attack.Results)])  # fmt: skip
    return {
        "seconds": wall,
        "cpu_seconds": _cpu_seconds() - cpu,
        "device_seconds": device_seconds[0],
        "host_seconds": wall - device_seconds[0],
        "device_calls": calls[0],
        "images": len(results.work_ids),
        "evaluations": progress.evaluations,
        "active_evaluations": progress.active_evaluations,
        "iterations": progress.iterations,
        "queries_per_s": progress.active_evaluations / wall,
        "images_per_s": len(results.work_ids) / wall,
        "successes": int(np.sum(results.success)),
        "mean_queries": float(np.mean(results.queries)) if len(results.queries) else 0.0,
        "digest": digest(results),
        "success_by_work_id": results.success[np.argsort(results.work_ids)].tolist(),
    }


def scipy_attack(forward_probs, params, image: np.ndarray, true_label: int, config: de.DEConfig,
                 seed: int) -> dict:  # fmt: skip
    """SciPy's DE on one image, as the public implementations call it (early stop off).

    Total population `popsize` (SciPy multiplies its `popsize` by the number of
    genes), recombination 1, dithered mutation (0.5, 1), no polish, `maxiter`
    = generations, and one model call per generation (`vectorized=True`, which
    needs `updating='deferred'`). `atol=-1` turns the convergence stop off, as
    one-pixel-attack-keras does. The objective perturbs the image in NumPy.
    """
    from scipy.optimize import differential_evolution

    height, width = image.shape[:2]
    genes = config.num_genes
    bounds = [(0, height), (0, width), (0, 255), (0, 255), (0, 255)] * config.num_pixels
    population = max(1, config.popsize // genes)
    image = image.astype(np.float32)
    evaluated = [0]  # SciPy's nfev counts calls when vectorized, so count candidates here

    def objective(xs):  # xs [genes, n]
        applied = de.applied_pixels(xs.T, image.shape, config.round_rgb)  # [n, k, 5]
        n = applied.shape[0]
        evaluated[0] += n
        batch = np.repeat(image[None], n, axis=0)  # [n, H, W, 3]
        rows, cols = applied[..., 0].astype(np.intp), applied[..., 1].astype(np.intp)
        batch[np.arange(n)[:, None], rows, cols] = applied[..., 2:]
        probs = np.asarray(forward_probs(params, batch)[0])  # (probs, all finite)
        return probs[:, true_label]

    started = time.perf_counter()
    result = differential_evolution(
        objective, bounds, maxiter=config.generations, popsize=population, recombination=1.0,
        mutation=(0.5, 1.0), polish=False, atol=-1, tol=0.0, vectorized=True,
        updating="deferred", rng=np.random.default_rng(seed),
    )  # fmt: skip
    wall = time.perf_counter() - started
    return {"seconds": wall, "queries": evaluated[0], "fun": float(result.fun)}


def run_scipy(model, config: de.DEConfig, workload: Workload, seed: int = 0) -> dict:
    forward_probs = attack._jitted_probs(model.apply_fn)
    params = jax.device_put(model.params)
    started, cpu = time.perf_counter(), _cpu_seconds()
    runs = [
        scipy_attack(forward_probs, params, image, int(label), config, seed + i)
        for i, (image, label) in enumerate(zip(workload.images, workload.true_labels, strict=True))
    ]
    wall = time.perf_counter() - started
    queries = sum(r["queries"] for r in runs)
    return {
        "seconds": wall,
        "cpu_seconds": _cpu_seconds() - cpu,
        "images": len(runs),
        "queries": queries,
        "queries_per_image": queries / max(len(runs), 1),
        "queries_per_s": queries / wall,
        "images_per_s": len(runs) / wall,
        "successes": sum(r["fun"] < 0.5 for r in runs),  # p(true) < 0.5 implies a wrong argmax
    }


# ---------------------------------------------------------------------------
# Where the engine's time goes.


def _seconds_per_iteration(loop, *args, iterations: int, repetitions: int) -> float:
    """Median seconds per iteration of a jitted loop of `iterations` steps."""
    jax.block_until_ready(loop(*args))  # compile
    seconds = []
    for _ in range(repetitions):
        started = time.perf_counter()
        jax.block_until_ready(loop(*args))
        seconds.append((time.perf_counter() - started) / iterations)
    return float(np.median(seconds))


def step_parts(model, config: de.DEConfig, slots: int, workload: Workload, iterations: int = 10,
               repetitions: int = 5) -> dict:  # fmt: skip
    """Seconds per generation of the engine's parts without the model, on its shapes.

    `de_step`: proposing candidates (mutation with its random numbers, and the
    initial population) and selection, as `engine._generation` calls them.
    `perturb`: writing the candidates' pixels into copies of the images, the
    model's input. Each runs `iterations` times in one jitted loop, as in the
    engine (buffers reused, no dispatch per generation).
    """
    image_shape = model.image_shape
    low, high = de.bounds(image_shape, config.num_pixels)
    key = jax.random.key(0)
    sample = workload.take(slots)
    images = jnp.asarray(sample.images, jnp.float32)  # [S, H, W, 3]
    labels = jnp.asarray(sample.true_labels)  # [S]
    indices, targets = jnp.arange(slots), jnp.full((slots,), -1)
    probs = jax.nn.softmax(
        jax.random.normal(key, (slots, config.popsize, model.num_classes)), axis=-1
    )  # [S, popsize, C]

    def propose(de_state, fresh):
        image_keys = jax.vmap(
            lambda index, target: jax.random.fold_in(jax.random.fold_in(key, index), target + 1)
        )(indices, targets)
        return jax.vmap(de.propose, in_axes=(0, 0, 0, None, None, None))(
            image_keys, de_state, fresh, config, low, high
        )  # [S, popsize, genes]

    def de_step(de_state, fresh):
        candidates = propose(de_state, fresh)
        return jax.vmap(de.update, in_axes=(0, 0, 0, 0, 0, 0, None, None))(
            de_state, fresh, candidates, probs, labels, targets, config, False
        )

    def perturb(candidates):
        apply = jax.vmap(jax.vmap(lambda image, c: de.apply_candidate(image, c, config.round_rgb),
                                  (None, 0)), (0, 0))  # fmt: skip
        return apply(images, candidates).reshape((slots * config.popsize, *image_shape))

    @jax.jit
    def de_loop(de_state):  # the generation advances, so every step draws new numbers
        not_fresh = jnp.zeros((slots,), bool)
        return jax.lax.fori_loop(0, iterations, lambda _, s: de_step(s, not_fresh), de_state)

    @jax.jit
    def perturb_loop(candidates):
        def body(_, carry):
            candidates, _ = carry
            candidates = candidates.at[0, 0, 0].add(1.0)  # new input every step: nothing hoisted
            return candidates, perturb(candidates)

        out = jnp.zeros((slots * config.popsize, *image_shape), jnp.float32)
        return jax.lax.fori_loop(0, iterations, body, (candidates, out))[1]

    # Random populations and candidates within the bounds: the cost does not depend on them.
    rng = np.random.default_rng(0)
    within = lambda *shape: np.asarray(low + rng.random(shape) * (high - low), np.float32)
    state = engine.init_state(slots, image_shape, model.num_classes, config).de_state
    state = state.replace(
        population=within(slots, config.popsize, config.num_genes),
        fitness=np.asarray(rng.random((slots, config.popsize)), np.float32),
    )
    timing = dict(iterations=iterations, repetitions=repetitions)
    return {
        "de_step": _seconds_per_iteration(de_loop, state, **timing),
        "perturb": _seconds_per_iteration(
            perturb_loop, within(slots, config.popsize, config.num_genes), **timing
        ),
    }


def trivial_model(model: LoadedModel) -> LoadedModel:
    """A stand-in that reads every pixel but costs almost nothing: the loop without a model."""
    weights = jax.random.normal(jax.random.key(0), (3, model.num_classes)) * 0.01

    def apply_fn(params, images):  # [N, H, W, 3] -> [N, C]
        return jnp.mean(images, axis=(1, 2)) @ params

    return dataclasses.replace(model, name=model.name + "@trivial", apply_fn=apply_fn,
                               params=weights)  # fmt: skip


def breakdown(engine_run: dict, ceiling_qps: float, parts: dict, trivial_run: dict) -> dict:
    """Splits the engine's wall time: 1 - efficiency = idle + de + perturb + host + other.

    The model at the ceiling would need `evaluations / ceiling` seconds; the
    part of that spent on idle slots is lost, and so is all the wall time
    beyond it. `other` is what the measured parts do not explain: the loop's
    bookkeeping, and the in-loop model running faster or slower than alone
    (on a shared machine, mostly noise). `accounted_efficiency` instead adds
    the measured cost of the loop without a model (a trivial model, host work
    included) to the model's time at the ceiling: it is not subject to the
    noise of comparing two long runs.
    """
    wall = engine_run["seconds"]
    iterations = max(engine_run["iterations"], 1)
    model_seconds = engine_run["evaluations"] / ceiling_qps
    model_share = model_seconds / wall
    active = engine_run["active_evaluations"] / max(engine_run["evaluations"], 1.0)
    idle = model_share * (1.0 - active)
    de_share = iterations * parts["de_step"] / wall
    perturb_share = iterations * parts["perturb"] / wall
    host_share = engine_run["host_seconds"] / wall
    loop_seconds = trivial_run["seconds"] / max(trivial_run["iterations"], 1)  # per generation
    return {
        "efficiency": model_share - idle,
        "accounted_efficiency": active
        * model_seconds
        / (model_seconds + iterations * loop_seconds),
        "idle_slots": idle,
        "de_step": de_share,
        "perturb": perturb_share,
        "host": host_share,
        "other": 1.0 - model_share - de_share - perturb_share - host_share,
        "idle_share_of_evaluations": 1.0 - active,
        "seconds_per_generation": {
            "engine": wall / iterations,
            "model_at_ceiling": model_seconds / iterations,
            "de_step": parts["de_step"],
            "perturb": parts["perturb"],
            "loop_with_trivial_model": loop_seconds,
            "host_per_device_call": engine_run["host_seconds"] / max(engine_run["device_calls"], 1),
        },
    }


# ---------------------------------------------------------------------------
# Memory.


def loop_memory(model, config: de.DEConfig, slots: int, chunk: int) -> dict:
    """Bytes of the compiled device loop (XLA's memory analysis): arguments, temporaries, output.

    The arguments are placed as `Attacker.run` places them, so the lowering is
    the one a run compiles (and is found in the compilation cache after one).
    """
    attacker = attack.Attacker(model, config, False, slots, jax.local_devices()[:1])  # per device
    sharding = NamedSharding(attacker.mesh, P("data"))
    state = engine.init_state(slots, model.image_shape, model.num_classes, config, 1)
    queue = engine.empty_queue(chunk, model.image_shape)
    lowered = attacker._run_queue.lower(
        jax.random.key(0), jax.device_put(state, sharding),
        jax.device_put(queue.replace(length=np.zeros((1,), np.int32)), sharding),
        np.asarray(True), attacker._params, np.int32(8),
    )  # fmt: skip
    analysis = lowered.compile().memory_analysis()
    if analysis is None:
        return {}
    return {
        "argument_bytes": int(analysis.argument_size_in_bytes),
        "temp_bytes": int(analysis.temp_size_in_bytes),
        "output_bytes": int(analysis.output_size_in_bytes),
        "alias_bytes": int(analysis.alias_size_in_bytes),
    }


def forward_memory(model, batch: int) -> int | None:
    """Temporary bytes of the bare forward pass at `batch` images (XLA's memory analysis)."""
    images = jax.ShapeDtypeStruct((batch, *model.image_shape), jnp.float32)
    analysis = jax.jit(model.apply_fn).lower(model.params, images).compile().memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def memory(model, config: de.DEConfig, slot_counts, chunk: int, measured_peak=None) -> dict:
    """Device memory per in-flight image, from the compiled loop at several slot counts.

    `per_slot` is (temporaries + arguments) / slots at each count; `marginal`
    is the growth per extra slot between the smallest and largest count,
    which leaves out the fixed cost (parameters, code). `auto_slots_estimate`
    is `run.slot_bytes`, what `run.auto_slots` assumes on accelerators.
    """
    rows = []
    for slots in slot_counts:
        row = {"slots": slots, **loop_memory(model, config, slots, chunk)}
        if "temp_bytes" in row:
            row["per_slot_bytes"] = (row["temp_bytes"] + row["argument_bytes"]) / slots
        rows.append(row)
    out = {"loop": rows}
    if len(rows) >= 2 and "temp_bytes" in rows[0]:
        first, last = rows[0], rows[-1]
        total = lambda r: r["temp_bytes"] + r["argument_bytes"]
        out["marginal_bytes_per_slot"] = (total(last) - total(first)) / (
            last["slots"] - first["slots"]
        )
    out["forward_temp_bytes_per_popsize_batch"] = forward_memory(model, config.popsize)
    out["auto_slots_estimate_bytes_per_slot"] = run_lib.slot_bytes(model, config.popsize)
    if measured_peak is not None:
        out["device_peak_bytes"] = measured_peak
    return out


def device_peak_bytes():
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - optional per backend
        stats = None
    return None if not stats else stats.get("peak_bytes_in_use")


# ---------------------------------------------------------------------------
# Scaling.


def throughput_point(model, config: de.DEConfig, slots: int, workload: Workload,
                     repetitions: int, loop_calls: int = 0) -> dict:  # fmt: skip
    """Forward ceilings and engine queries/s at one setting (early stop off), interleaved."""
    forward = Forward(model, slots * config.popsize, loop_calls=loop_calls)
    run_engine(model, config, slots, workload)  # compile and warm up
    ceiling, in_loop, engine_qps = [], [], []
    for _ in range(repetitions):
        ceiling.append(forward.time()["queries_per_s"])
        engine_qps.append(run_engine(model, config, slots, workload)["queries_per_s"])
        if loop_calls:
            in_loop.append(forward.time_loop()["queries_per_s"])
    row = {"forward_qps": spread(ceiling), "engine_qps": spread(engine_qps),
           "efficiency": spread(np.divide(engine_qps, ceiling))}  # fmt: skip
    if loop_calls:
        row["forward_in_loop_qps"] = spread(in_loop)
        row["efficiency_in_loop"] = spread(np.divide(engine_qps, in_loop))
    return row


def forward_sweep(model, batches, rounds: int, seed: int = 0) -> list[dict]:
    """Bare forward queries/s at several batch sizes, interleaved in rounds.

    The order rotates every round, and each batch is also compared with the
    first batch of the same round, so slow stretches of a shared machine hit
    every batch size alike.
    """
    forwards = {b: Forward(model, b, seed) for b in batches}
    qps = {b: [] for b in batches}
    for r in range(rounds):
        for b in batches[r % len(batches) :] + batches[: r % len(batches)]:
            qps[b].append(forwards[b].time()["queries_per_s"])
    first = batches[0]
    return [{"batch": b, "forward_qps": spread(qps[b]),
             "relative_to_first": spread(np.divide(qps[b], qps[first]))}
            for b in batches]  # fmt: skip


def device_scaling(spec: str, config, device_counts, slots: int, generations: int,
                   repetitions: int) -> list[dict]:  # fmt: skip
    """Engine throughput on N forced host devices, each count in its own process.

    Every count attacks the same images with `slots` per device. On a CPU the
    devices share the same cores: this shows that the sharded loop runs and
    gives identical results (equal digests), not a speed-up.
    """
    rows = []
    for count in device_counts:
        job = {
            "model": spec, "data": config.data, "split": config.split, "seed": config.seed,
            "pixels": config.pixels, "de": dict(config.de), "slots": slots,
            "generations": generations, "repetitions": repetitions,
            "images": slots * max(device_counts),  # the same images for every count
        }  # fmt: skip
        row = _run_child(job, f"--xla_force_host_platform_device_count={count}")
        rows.append({"devices": count, **row} if "error" in row else row)
    return rows


def _run_child(job: dict, xla_flags: str) -> dict:
    """Runs `job` in `python -m opa_jax.benchmark` with `xla_flags` added to XLA_FLAGS.

    Returns the child's JSON line, or {"error": the end of its stderr}.
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
    out = subprocess.run(
        [sys.executable, "-m", "opa_jax.benchmark", json.dumps(job)],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"error": out.stderr[-2000:]}
    return json.loads(lines[-1])


def _child_setup(job: dict):
    """The model, config and DE settings (early stop off) of a child job."""
    model = load_model(job["model"])
    config = ml_collections.ConfigDict(
        {k: job[k] for k in ("data", "split", "seed", "pixels", "de")}
    )
    return model, config, de_config(config, generations=job["generations"], stop="none")


def _device_child(job: dict) -> dict:
    """One device-count point (run in a subprocess with forced host devices)."""
    model, config, dconf = _child_setup(job)
    devices = jax.local_devices()
    num_images = job["images"]
    workload = load_workload(model, config, num_images)
    run_engine(model, dconf, job["slots"], workload, devices=devices)  # compile and warm up
    runs = [run_engine(model, dconf, job["slots"], workload, devices=devices)
            for _ in range(job["repetitions"])]  # fmt: skip
    return {
        "devices": len(devices),
        "slots_per_device": job["slots"],
        "images": num_images,
        "engine_qps": spread([r["queries_per_s"] for r in runs]),
        "digest": runs[0]["digest"],
    }


def xla_flag_comparison(spec: str, config, flag_sets, slots: int, generations: int,
                        rounds: int, loop_calls: int) -> list[dict]:  # fmt: skip
    """Forward ceiling and engine queries/s under several `XLA_FLAGS` settings.

    Each (round, flag set) runs in its own process, since XLA reads its flags
    once per process. Rounds interleave the flag sets, so a slow stretch of a
    shared machine hits all of them; `speedup` is per round, against the
    first flag set. `max_prob_diff` compares the clean-image probabilities
    with the first flag set's, and `digest` the attack results.
    """
    runs = {flags: [] for flags in flag_sets}
    for _ in range(rounds):
        for flags in flag_sets:
            job = {
                "kind": "flags", "model": spec, "data": config.data, "split": config.split,
                "seed": config.seed, "pixels": config.pixels, "de": dict(config.de),
                "slots": slots, "generations": generations, "loop_calls": loop_calls,
            }  # fmt: skip
            runs[flags].append(_run_child(job, flags))
    first = flag_sets[0]
    rows = []
    for flags in flag_sets:
        good = [r for r in runs[flags] if "error" not in r]
        if not good:
            rows.append({"flags": flags, "error": runs[flags][0]["error"]})
            continue
        pairs = [(r, b) for r, b in zip(runs[flags], runs[first], strict=True)
                 if "error" not in r and "error" not in b]  # fmt: skip
        rows.append({
            "flags": flags,
            "forward_qps": spread([r["forward_qps"] for r in good]),
            "engine_qps": spread([r["engine_qps"] for r in good]),
            "forward_speedup": spread([r["forward_qps"] / b["forward_qps"] for r, b in pairs]),
            "engine_speedup": spread([r["engine_qps"] / b["engine_qps"] for r, b in pairs]),
            "max_prob_diff": float(max(
                np.max(np.abs(np.subtract(r["clean_probs"], b["clean_probs"]))) for r, b in pairs
            )) if pairs else None,
            "digest": good[0]["digest"],
            "batch": good[0]["batch"],
        })  # fmt: skip
    return rows


def _flags_child(job: dict) -> dict:
    """One flag-set point (run in a subprocess with its own XLA_FLAGS)."""
    model, config, dconf = _child_setup(job)
    workload = load_workload(model, config, job["slots"])
    forward = Forward(model, job["slots"] * dconf.popsize, loop_calls=job["loop_calls"])
    run_engine(model, dconf, job["slots"], workload)  # compile and warm up
    engine_run = run_engine(model, dconf, job["slots"], workload)
    forward_qps = forward.time_loop()["queries_per_s"]
    clean = attack.predict_probs(model, workload.images)
    return {
        "batch": forward.batch,
        "forward_qps": forward_qps,
        "engine_qps": engine_run["queries_per_s"],
        "digest": engine_run["digest"],
        "clean_probs": np.asarray(clean).tolist(),
    }


# ---------------------------------------------------------------------------
# The whole benchmark.


def benchmark(config: ml_collections.ConfigDict, workdir: str, out: str = "",
              model: LoadedModel | None = None, log=print) -> dict:  # fmt: skip
    """Runs every enabled measurement; writes JSON and appends a Markdown report.

    `model` replaces `config.model` (tests pass an in-memory model). Returns the report.
    """
    t0 = time.perf_counter()
    model = model or load_model(config.model)
    model = run_lib.wrap_precision(model, config.precision)
    throughput = de_config(config, stop="none")
    slots = config.slots or run_lib.auto_slots(model, throughput.popsize)
    reps = config.repetitions
    report = {
        "machine": machine_info(),
        "model": {"name": model.name, "image_shape": list(model.image_shape),
                  "num_classes": model.num_classes, "trained": model.meta.get("trained", True),
                  "parameters": int(sum(np.size(x) for x in jax.tree.leaves(model.params)))},
        "config": json.loads(config.to_json()),
        "de": dataclasses.asdict(throughput),
        "slots": slots,
        "batch": slots * throughput.popsize,
    }  # fmt: skip
    log(f"model {model.name}, {slots} slots x popsize {throughput.popsize}")

    # Forward ceiling, engine (early stop off) and the SciPy baseline, interleaved:
    # forward, engine, baseline, forward, engine, ... so that every engine run lies
    # between two forward timings, whose harmonic mean is its ceiling.
    workload = load_workload(model, config, max(config.num_images, config.early_stop.num_images))
    report["images"] = workload.source
    main = workload.take(config.num_images)
    num_devices = len(jax.local_devices())
    chunk = whole_chunk(len(main.images), num_devices)
    forward = Forward(model, slots * throughput.popsize, config.seed, config.forward_loop_calls)
    bf16 = config.bf16.enabled and config.precision == "float32"
    if bf16:
        model16 = run_lib.wrap_precision(model, "bfloat16")
        forward16 = Forward(model16, forward.batch, config.seed)
    run_engine(model, throughput, slots, main.take(1), config.seed, chunk=chunk)  # compile
    baseline_images = workload.take(config.baseline.num_images)
    if config.baseline.enabled:
        run_scipy(model, dataclasses.replace(throughput, generations=0), baseline_images.take(1))
    ceilings, loops = [forward.time()], [forward.time_loop()]
    engines, baselines, ceilings16 = [], [], []
    for r in range(reps):
        engines.append(run_engine(model, throughput, slots, main, config.seed))
        if config.baseline.enabled:
            baselines.append(run_scipy(model, throughput, baseline_images, config.seed))
        if bf16:
            ceilings16.append(forward16.time())
        ceilings.append(forward.time())
        loops.append(forward.time_loop())
        scipy = f", scipy {baselines[-1]['queries_per_s']:.1f} q/s" if baselines else ""
        log(f"repetition {r}: forward {ceilings[-1]['queries_per_s']:.1f} q/s, "
            f"engine {engines[-1]['queries_per_s']:.1f} q/s{scipy}")  # fmt: skip

    # The ceiling for engine run r: both forward timings around it, as one rate.
    def around(timings):
        return [2.0 / (1.0 / a["queries_per_s"] + 1.0 / b["queries_per_s"])
                for a, b in zip(timings[:-1], timings[1:], strict=True)]  # fmt: skip

    bracket = around(ceilings)
    bracket_loop = around(loops) if forward.loop_calls else None
    bracket_cpu = [2.0 * forward.queries / (a["cpu_seconds"] + b["cpu_seconds"])
                   for a, b in zip(ceilings[:-1], ceilings[1:], strict=True)]  # fmt: skip
    report["forward_ceiling"] = {
        "batch": forward.batch,
        "queries_per_call": forward.queries,
        "queries_per_s": spread([c["queries_per_s"] for c in ceilings]),
        "queries_per_cpu_s": spread([forward.queries / c["cpu_seconds"] for c in ceilings]),
    }
    if bracket_loop:
        report["forward_ceiling"]["in_loop_calls"] = forward.loop_calls
        report["forward_ceiling"]["in_loop_queries_per_s"] = spread(
            [c["queries_per_s"] for c in loops]
        )
    report["engine"] = {
        "images": len(main.images),
        "generations": throughput.generations,
        "queries_per_s": spread([e["queries_per_s"] for e in engines]),
        "images_per_s": spread([e["images_per_s"] for e in engines]),
        "queries_per_cpu_s": spread([e["active_evaluations"] / e["cpu_seconds"] for e in engines]),
        "runs": [{k: v for k, v in e.items() if k != "success_by_work_id"} for e in engines],
    }
    report["efficiency"] = spread(
        [e["queries_per_s"] / c for e, c in zip(engines, bracket, strict=True)]
    )
    if bracket_loop:
        report["efficiency_in_loop"] = spread(
            [e["queries_per_s"] / c for e, c in zip(engines, bracket_loop, strict=True)]
        )
    report["efficiency_cpu_time"] = spread(
        [(e["active_evaluations"] / e["cpu_seconds"]) / c
         for e, c in zip(engines, bracket_cpu, strict=True)]
    )  # fmt: skip
    if baselines:
        report["scipy_baseline"] = {
            "images": len(baseline_images.images),
            "queries_per_image": baselines[0]["queries_per_image"],
            "engine_queries_per_image": engines[0]["evaluations"] / len(main.images),
            "queries_per_s": spread([b["queries_per_s"] for b in baselines]),
            "images_per_s": spread([b["images_per_s"] for b in baselines]),
            "speedup_images_per_s": spread(
                [
                    e["images_per_s"] / b["images_per_s"]
                    for e, b in zip(engines, baselines, strict=True)
                ]
            ),  # fmt: skip
        }

    sections = {"main": time.perf_counter() - t0}
    mark = time.perf_counter()

    def section_done(name):
        nonlocal mark
        sections[name] = time.perf_counter() - mark
        mark = time.perf_counter()

    # Where the time goes.
    if config.breakdown:
        parts = step_parts(model, throughput, slots, main)
        trivial = trivial_model(model)
        run_engine(trivial, throughput, slots, main, config.seed)  # compile
        trivial_run = run_engine(trivial, throughput, slots, main, config.seed)
        # Against the in-loop ceiling where measured: it calls the model as the engine does.
        shares = [breakdown(e, c, parts, trivial_run)
                  for e, c in zip(engines, bracket_loop or bracket, strict=True)]  # fmt: skip
        report["breakdown"] = {
            name: spread([s[name] for s in shares])["median"]
            for name in ("efficiency", "accounted_efficiency", "idle_slots", "de_step", "perturb",
                         "host", "other", "idle_share_of_evaluations")
        }  # fmt: skip
        report["breakdown"]["seconds_per_generation"] = {
            name: float(np.median([s["seconds_per_generation"][name] for s in shares]))
            for name in shares[0]["seconds_per_generation"]
        }
        report["breakdown"]["trivial_model_queries_per_s"] = trivial_run["queries_per_s"]
        report["breakdown"]["ceiling"] = "in_loop" if bracket_loop else "one_call"
        section_done("breakdown")

    # A profile of one engine run: device self time per XLA operation.
    prof = config.get("profile")
    if prof is not None and prof.enabled:
        logdir = os.path.join(workdir, "profile")
        profiled, trace_file, wall = profiling.trace(
            lambda: run_engine(model, throughput, slots, main, config.seed), logdir
        )
        table = profiling.op_table(trace_file, prof.top)
        report["profile"] = {
            **table,
            "wall_seconds": wall,
            "engine_queries_per_s": profiled["queries_per_s"],
            # On a CPU: the cores busy on average; on an accelerator, the streams.
            "mean_operations_running": table["device_seconds"] / wall,
        }
        section_done("profile")

    # Early stopping on (the configured stop rule), on real images where available.
    stop_config = None
    if config.early_stop.enabled:
        stop_config = de_config(config, generations=config.early_stop.generations or None)
        early = workload.take(config.early_stop.num_images)
        run_engine(model, stop_config, slots, early.take(1), config.seed,
                   chunk=whole_chunk(len(early.images), num_devices))  # fmt: skip
        runs = [run_engine(model, stop_config, slots, early, config.seed)
                for _ in range(config.early_stop.repetitions)]  # fmt: skip
        report["early_stop"] = {
            "stop": stop_config.stop,
            "generations": stop_config.generations,
            "images": len(early.images),
            "successes": runs[0]["successes"],
            "mean_queries": runs[0]["mean_queries"],
            "queries_per_s": spread([r["queries_per_s"] for r in runs]),
            "images_per_s": spread([r["images_per_s"] for r in runs]),
            "idle_share_of_evaluations": spread(
                [1 - r["active_evaluations"] / r["evaluations"] for r in runs]
            ),
            "device_calls": runs[0]["device_calls"],
        }
        section_done("early_stop")

    # bfloat16 forward passes: speed, and success on the same images and seed.
    if bf16:
        forward_ratio = [b["queries_per_s"] / c for b, c in zip(ceilings16, bracket, strict=True)]
        clean32 = attack.predict_probs(model, workload.images)
        clean16 = attack.predict_probs(model16, workload.images)
        section = {
            "forward_qps_bf16": spread([c["queries_per_s"] for c in ceilings16]),
            "forward_speedup": spread(forward_ratio),
            "clean_max_abs_prob_diff": float(np.max(np.abs(clean32 - clean16))),
            "clean_argmax_agreement": float(np.mean(clean32.argmax(-1) == clean16.argmax(-1))),
            "clean_images": len(workload.images),
        }
        if config.bf16.engine_repetitions:
            run_engine(model16, throughput, slots, main.take(1), config.seed, chunk=chunk)
            pairs = [(run_engine(model16, throughput, slots, main, config.seed)["queries_per_s"],
                      run_engine(model, throughput, slots, main, config.seed)["queries_per_s"])
                     for _ in range(config.bf16.engine_repetitions)]  # fmt: skip
            section["engine_qps_bf16"] = spread([a for a, _ in pairs])
            section["engine_speedup"] = spread([a / b for a, b in pairs])
        if stop_config is not None:
            early16 = run_engine(model16, stop_config, slots, early, config.seed)
            early32 = runs[0]
            n = len(early.images)
            p = (early32["successes"] + early16["successes"]) / (2 * n)
            section.update({
                "success_images": n,
                "successes_float32": early32["successes"],
                "successes_bf16": early16["successes"],
                "same_outcome_share": float(np.mean(np.equal(
                    early32["success_by_work_id"], early16["success_by_work_id"]))),
                "early_stop_qps_bf16": early16["queries_per_s"],
                # Two binomial rates on n images each: the standard error of their difference.
                "success_rate_difference": (early16["successes"] - early32["successes"]) / n,
                "success_rate_difference_stderr": float(np.sqrt(2 * p * (1 - p) / n)),
            })  # fmt: skip
        report["bf16"] = section
        section_done("bf16")

    # Memory per in-flight image.
    if config.memory.enabled:
        counts = sorted({*config.memory.slots, slots})
        report["memory"] = memory(model, throughput, counts, chunk, device_peak_bytes())
        section_done("memory")

    # Scaling.
    sc = config.scaling
    if sc.enabled:
        scaling = {}
        base = dict(slots=slots, popsize=throughput.popsize, pixels=throughput.num_pixels)

        points = {}

        def point(slots, popsize, pixels):
            if (slots, popsize, pixels) in points:  # the base setting recurs on every axis
                return points[slots, popsize, pixels]
            dconf = dataclasses.replace(
                throughput, popsize=popsize, num_pixels=pixels, generations=sc.generations
            )
            images = workload.take(slots * num_devices)  # a full wave of slots on every device
            row = throughput_point(model, dconf, slots, images, sc.repetitions,
                                   sc.forward_loop_calls)  # fmt: skip
            log(f"scaling slots={slots} popsize={popsize} pixels={pixels}: "
                f"engine {row['engine_qps']['median']:.1f} q/s, "
                f"efficiency {row['efficiency']['median']:.3f}")  # fmt: skip
            points[slots, popsize, pixels] = {
                "slots": slots,
                "popsize": popsize,
                "pixels": pixels,
                "batch": slots * popsize,
                **row,
            }
            return points[slots, popsize, pixels]

        for name, values in (("slots", sc.slots), ("popsize", sc.popsize), ("pixels", sc.pixels)):
            scaling[name] = [point(**(base | {name: v})) for v in values]
        rows = []
        for spec in sc.image_models:
            other = run_lib.wrap_precision(load_model(spec), config.precision)
            dconf = dataclasses.replace(throughput, popsize=sc.image_popsize,
                                        generations=sc.image_generations)  # fmt: skip
            count = sc.image_slots * num_devices  # a full wave of slots on every device
            load = Workload(random_images(count, other.image_shape, config.seed),
                            np.zeros(count, np.int32), np.arange(count), "random")  # fmt: skip
            row = throughput_point(other, dconf, sc.image_slots, load, sc.repetitions,
                                   sc.forward_loop_calls)  # fmt: skip
            log(f"scaling {spec}: engine {row['engine_qps']['median']:.1f} q/s")
            rows.append({"model": spec, "image_shape": list(other.image_shape),
                         "trained": other.meta.get("trained", True), "slots": sc.image_slots,
                         "popsize": sc.image_popsize, **row})  # fmt: skip
        scaling["image_size"] = rows
        if sc.forward_batches:
            scaling["forward_batches"] = forward_sweep(
                model, list(sc.forward_batches), sc.forward_rounds, config.seed
            )
        section_done("scaling")
        if sc.devices:
            scaling["devices"] = device_scaling(
                config.model, config, sc.devices, sc.device_slots, sc.generations, sc.repetitions
            )
            section_done("devices")
        report["scaling"] = scaling

    xf = config.get("xla_flags")
    if xf is not None and xf.enabled:
        log("XLA flags: forward and engine under each flag set, one process each")
        report["xla_flags"] = xla_flag_comparison(
            config.model, config, list(xf.flag_sets), xf.slots or slots, xf.generations,
            xf.rounds, xf.forward_loop_calls,
        )  # fmt: skip
        section_done("xla_flags")

    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    report["section_seconds"] = sections
    report["wall_seconds"] = time.perf_counter() - t0
    write_report(report, workdir, out)
    return report


# ---------------------------------------------------------------------------
# Output.


def _fmt(s, digits=1) -> str:
    if s is None:
        return "-"
    if isinstance(s, dict):
        if s.get("median") is None:
            return "-"
        return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"
    return f"{s:.{digits}f}"


def xla_flags_table(rows) -> list[str]:
    """The Markdown table of `xla_flag_comparison`."""
    lines = ["| XLA_FLAGS (one process per round and setting) | batch | forward q/s, in loop | "
             "engine q/s | forward speed-up | engine speed-up | max prob diff | results |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        name = f"`{row['flags']}`" if row["flags"] else "(default)"
        if "error" in row:
            lines.append(f"| {name} | - | failed | - | - | - | - | - |")
            continue
        diff = "-" if row["max_prob_diff"] is None else f"{row['max_prob_diff']:.1e}"
        lines.append(
            f"| {name} | {row['batch']} | {_fmt(row['forward_qps'])} | "
            f"{_fmt(row['engine_qps'])} | {_fmt(row['forward_speedup'], 2)} | "
            f"{_fmt(row['engine_speedup'], 2)} | {diff} | {row['digest']} |"
        )
    return lines


def markdown(report: dict) -> str:
    """The report as Markdown tables: median [min, max] over repetitions."""
    m = report["machine"]
    lines = [
        f"### {report['model']['name']} ({'x'.join(map(str, report['model']['image_shape']))}, "
        f"{'trained' if report['model']['trained'] else 'random weights'}), "
        f"{time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"{m['cpu_model']}, {m['cpu_cores']} cores, jax {m['jax']} {m['backend']} "
        f"({len(m['devices'])} device(s): {m['device_kind']}); load average "
        f"{m['load_average_at_start'][0]:.1f} at start, "
        f"{m.get('load_average_at_end', [float('nan')])[0]:.1f} at end. "
        f"{report['slots']} slots x popsize {report['de']['popsize']} = batch {report['batch']}, "
        f"{report['de']['num_pixels']} pixel(s), {report['de']['generations']} generations, "
        f"{report['config']['repetitions']} repetitions; images: {report['images']}. "
        f"Median [min, max].",
        "",
        "| measure | value |",
        "|---|---|",
        f"| forward ceiling, one jitted call (queries/s) | "
        f"{_fmt(report['forward_ceiling']['queries_per_s'])} |",
        f"| forward ceiling, {report['forward_ceiling'].get('in_loop_calls')} calls in a jitted "
        f"loop (queries/s) | {_fmt(report['forward_ceiling'].get('in_loop_queries_per_s'))} |",
        f"| engine, early stop off (queries/s) | {_fmt(report['engine']['queries_per_s'])} |",
        f"| engine, early stop off (images/s) | {_fmt(report['engine']['images_per_s'], 3)} |",
        f"| efficiency = engine / one-call ceiling | {_fmt(report['efficiency'], 3)} |",
        f"| efficiency against the in-loop ceiling | {_fmt(report.get('efficiency_in_loop'), 3)} |",
        f"| efficiency, one-call ceiling, process CPU time | "
        f"{_fmt(report['efficiency_cpu_time'], 3)} |",
    ]
    if "scipy_baseline" in report:
        b = report["scipy_baseline"]
        lines += [
            f"| SciPy per-image baseline (queries/s) | {_fmt(b['queries_per_s'])} |",
            f"| SciPy per-image baseline (images/s) | {_fmt(b['images_per_s'], 3)} |",
            f"| speed-up over SciPy (images/s) | {_fmt(b['speedup_images_per_s'], 2)} |",
        ]
    if "early_stop" in report:
        e = report["early_stop"]
        lines += [
            f"| engine, early stop `{e['stop']}`, {e['generations']} generations (images/s) | "
            f"{_fmt(e['images_per_s'], 3)} |",
            f"| ... successes / images, mean queries | {e['successes']} / {e['images']}, "
            f"{e['mean_queries']:.0f} |",
        ]
    if "breakdown" in report:
        b = report["breakdown"]
        s = b["seconds_per_generation"]
        lines += [
            "",
            f"| share of engine wall time ({b['ceiling'].replace('_', '-')} ceiling) | value |",
            "|---|---|",
            f"| model at the ceiling, useful (= efficiency) | {b['efficiency']:.3f} |",
            f"| efficiency accounted from the loop without a model | "
            f"{b['accounted_efficiency']:.4f} |",
            f"| idle slots | {b['idle_slots']:.3f} |",
            f"| DE mutation + selection | {b['de_step']:.4f} |",
            f"| building perturbed images | {b['perturb']:.4f} |",
            f"| host work between device calls | {b['host']:.4f} |",
            f"| other (loop bookkeeping, in-loop model vs alone) | {b['other']:.3f} |",
            "",
            "| seconds per generation | value |",
            "|---|---|",
            *[f"| {name} | {value:.5f} |" for name, value in s.items()],
        ]
    if "profile" in report:
        p = report["profile"]
        lines += [
            "",
            f"Profile of one engine run ({p['wall_seconds']:.2f} s, "
            f"{p['engine_queries_per_s']:.1f} queries/s): device self time "
            f"{p['device_seconds']:.2f} s on {p['timelines']} timelines, "
            f"{p['mean_operations_running']:.2f} operations running on average. "
            f"Trace: `{p['trace_file']}`.",
            "",
            "| operation | self seconds | share | count |",
            "|---|---|---|---|",
            *[f"| `{op['name']}` | {op['seconds']:.4f} | {op['share']:.3f} | {op['count']} |"
              for op in p["ops"]],
        ]  # fmt: skip
    if "bf16" in report:
        b = report["bf16"]
        lines += [
            "",
            "| bfloat16 | value |",
            "|---|---|",
            f"| forward (queries/s) | {_fmt(b['forward_qps_bf16'])} |",
            f"| forward speed-up over float32 | {_fmt(b['forward_speedup'], 2)} |",
            f"| engine speed-up over float32 | {_fmt(b.get('engine_speedup'), 2)} |",
            f"| clean images: max abs prob difference, argmax agreement | "
            f"{b['clean_max_abs_prob_diff']:.4f}, {b['clean_argmax_agreement']:.3f} "
            f"({b['clean_images']} images) |",
        ]
        if "successes_bf16" in b:
            lines.append(
                f"| successes float32 / bfloat16 (same images, seed) | {b['successes_float32']}"
                f" / {b['successes_bf16']} of {b['success_images']} (difference "
                f"{b['success_rate_difference']:+.3f} +- {b['success_rate_difference_stderr']:.3f}"
                f" s.e.; same outcome {b['same_outcome_share']:.2f}) |"
            )
    if "memory" in report:
        mem = report["memory"]
        lines += ["", "| memory (XLA analysis of the loop) | bytes |", "|---|---|"]
        for row in mem["loop"]:
            if "per_slot_bytes" in row:
                lines.append(
                    f"| {row['slots']} slot(s): temp {row['temp_bytes'] / 2**20:.1f} MiB + "
                    f"arguments {row['argument_bytes'] / 2**20:.1f} MiB, per slot | "
                    f"{row['per_slot_bytes'] / 2**20:.1f} MiB |"
                )
        if "marginal_bytes_per_slot" in mem:
            marginal = mem["marginal_bytes_per_slot"] / 2**20
            lines.append(f"| marginal per extra slot | {marginal:.1f} MiB |")
        if mem.get("forward_temp_bytes_per_popsize_batch") is not None:
            lines.append(
                f"| bare forward temporaries at batch popsize | "
                f"{mem['forward_temp_bytes_per_popsize_batch'] / 2**20:.1f} MiB |"
            )
        lines.append(
            f"| run.auto_slots' accelerator estimate per slot | "
            f"{mem['auto_slots_estimate_bytes_per_slot'] / 2**20:.1f} MiB |"
        )
        if mem.get("device_peak_bytes") is not None:
            peak = mem["device_peak_bytes"] / 2**20
            lines.append(f"| device peak (memory_stats) | {peak:.1f} MiB |")
    if "scaling" in report:
        sc = report["scaling"]
        lines += ["", "| scaling | batch | forward q/s, one call | forward q/s, in loop | "
                  "engine q/s | efficiency (one call) | efficiency (in loop) |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for name in ("slots", "popsize", "pixels"):
            for row in sc[name]:
                lines.append(
                    f"| {name} = {row[name]} | {row['batch']} | {_fmt(row['forward_qps'])} | "
                    f"{_fmt(row.get('forward_in_loop_qps'))} | {_fmt(row['engine_qps'])} | "
                    f"{_fmt(row['efficiency'], 3)} | {_fmt(row.get('efficiency_in_loop'), 3)} |"
                )
        for row in sc.get("image_size", []):
            shape = "x".join(map(str, row["image_shape"][:2]))
            weights = "" if row["trained"] else ", random weights"
            lines.append(
                f"| {row['model']} ({shape}{weights}) | {row['slots'] * row['popsize']} | "
                f"{_fmt(row['forward_qps'])} | {_fmt(row.get('forward_in_loop_qps'))} | "
                f"{_fmt(row['engine_qps'])} | {_fmt(row['efficiency'], 3)} | "
                f"{_fmt(row.get('efficiency_in_loop'), 3)} |"
            )
        for row in sc.get("forward_batches", []):
            lines.append(
                f"| bare forward, batch {row['batch']} (interleaved rounds; relative to batch "
                f"{sc['forward_batches'][0]['batch']}: {_fmt(row['relative_to_first'], 3)}) | "
                f"{row['batch']} | {_fmt(row['forward_qps'])} | - | - | - | - |"
            )
        for row in sc.get("devices", []):
            if "error" in row:
                lines.append(f"| devices = {row['devices']} | - | - | - | failed | - | - |")
                continue
            lines.append(
                f"| devices = {row['devices']} ({row['slots_per_device']} slots each, results "
                f"{row['digest']}) | {row['images']} images | - | - | {_fmt(row['engine_qps'])} "
                "| - | - |"
            )
    if report.get("xla_flags"):
        lines += ["", *xla_flags_table(report["xla_flags"])]
    parts = ", ".join(f"{k} {v:.0f}" for k, v in report.get("section_seconds", {}).items())
    lines.append(f"\nTotal benchmark wall time {report['wall_seconds']:.0f} s ({parts}).\n")
    return "\n".join(lines)


def write_report(report: dict, workdir: str, out: str = "") -> None:
    os.makedirs(workdir, exist_ok=True)
    path = out or os.path.join(workdir, "benchmark.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    text = markdown(report)
    print(text)
    with open(os.path.join(workdir, "benchmark.md"), "a") as f:
        f.write(text + "\n")


if __name__ == "__main__":  # one point in its own process (device_scaling, xla_flag_comparison)
    _job = json.loads(sys.argv[1])
    _child = _flags_child if _job.get("kind") == "flags" else _device_child
    print(json.dumps(_child(_job)))
