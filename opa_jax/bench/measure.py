"""The benchmark's measurements, each a function that returns numbers.

- `Forward`: the bare jitted forward pass (the ceiling the engine is held to);
- `run_engine`: one timed attack through `attack.Attacker`;
- `run_scipy`: SciPy's `differential_evolution`, one image at a time;
- `throughput_point` and `forward_sweep`: those at one setting, interleaved;
- `Evaluation` and `evaluator_point`: the full and the incremental evaluator
  (`opa_jax.incremental`) beside the forward pass, interleaved.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from scipy.optimize import differential_evolution

from opa_jax import attack, de, incremental, plan
from opa_jax import data as data_lib
from opa_jax.models import LoadedModel, layers


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
            return Workload(
                self.images[:count], self.true_labels[:count], self.indices[:count], self.source
            )
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
    reason = "no dataset configured"
    if config.data:
        try:
            dataset = data_lib.load_dataset(config.data, config.split, model.image_shape)
        except Exception as e:  # noqa: BLE001 - fall back to random images, say why
            reason = f"{config.data} unavailable ({e})"
        else:
            if len(dataset.class_names) != model.num_classes:
                reason = f"{config.data} has {len(dataset.class_names)} classes"
            else:
                try:
                    positions, _ = plan.clean_pass(model, dataset, np.arange(len(dataset)), count)
                except Exception as e:  # noqa: BLE001 - e.g. images of another size
                    reason = f"{config.data} does not fit the model ({e})"
                else:
                    if len(positions) == count:
                        return Workload(
                            dataset.read(positions),
                            dataset.labels[positions].astype(np.int32),
                            dataset.indices[positions],
                            f"{config.data} (first {count} correctly classified)",
                        )
                    reason = f"{config.data} has fewer than {count} correctly classified images"
    images = random_images(count, model.image_shape, config.seed)
    labels = attack.predict_probs(model, images).argmax(-1).astype(np.int32)
    return Workload(images, labels, np.arange(count), f"random images ({reason})")


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
            return jax.jit(
                jax.shard_map(
                    fn, mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"), check_vma=False
                )
            )

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
        started, cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(self.params, self.images))
        wall = time.perf_counter() - started
        return {
            "seconds": wall,
            "queries_per_s": calls * self.queries / wall,
            "cpu_seconds": time.process_time() - cpu,
        }

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


def run_engine(
    model,
    config: de.DEConfig,
    slots: int,
    workload: Workload,
    seed: int = 0,
    devices=None,
    chunk: int | None = None,
    evaluator="full",
) -> dict:
    """One timed attack of the whole workload through `attack.Attacker`.

    The queue holds `chunk` items per device (default: the whole workload), so
    a warm-up on one image with the same `chunk` compiles the same loop.
    `Attacker.run` times its device calls until their outputs are ready, so
    `host_seconds` (wall time outside them) is the per-call host work:
    reading images, building and sending the queue, fetching and decoding
    results. `evaluator` is `attack.Attacker`'s ('full', 'incremental', 'auto' or one).
    """
    attacker = attack.Attacker(model, config, False, slots, devices, evaluator)
    counters = attack.LoopCounters()
    chunk = chunk or whole_chunk(len(workload.images), len(attacker.devices))
    started, cpu = time.perf_counter(), time.process_time()
    chunks = list(
        attacker.run(
            jax.random.key(seed), workload.items(), lambda p: workload.images[p], chunk, counters
        )
    )
    wall = time.perf_counter() - started
    results = attack.Results.concatenate(chunks)
    return {
        "seconds": wall,
        "cpu_seconds": time.process_time() - cpu,
        "device_seconds": counters.device_seconds,
        "host_seconds": wall - counters.device_seconds,
        "device_calls": counters.device_calls,
        "images": len(results.work_ids),
        "evaluations": counters.evaluations,
        "active_evaluations": counters.active_evaluations,
        "iterations": counters.iterations,
        "queries_per_s": counters.active_evaluations / wall,
        "images_per_s": len(results.work_ids) / wall,
        "successes": int(np.sum(results.success)),
        "mean_queries": float(np.mean(results.queries)) if len(results.queries) else 0.0,
        "digest": digest(results),
        "success_by_work_id": results.success[np.argsort(results.work_ids)].tolist(),
    }


def scipy_attack(
    forward_probs, params, image: np.ndarray, true_label: int, config: de.DEConfig, seed: int
) -> dict:
    """SciPy's DE on one image, as the public implementations call it (early stop off).

    Total population `popsize` (SciPy multiplies its `popsize` by the number of
    genes), recombination 1, dithered mutation (0.5, 1), no polish, `maxiter`
    = generations, and one model call per generation (`vectorized=True`, which
    needs `updating='deferred'`). `atol=-1` turns the convergence stop off, as
    one-pixel-attack-keras does. The objective perturbs the image in NumPy.

    Success is the engine's rule: some evaluated candidate's argmax differs from
    the true label. (A final p(true) < 0.5 is not that: with ten classes the true
    class can keep the argmax at 0.3.)
    """
    height, width = image.shape[:2]
    genes = config.num_genes
    bounds = [(0, height), (0, width), (0, 255), (0, 255), (0, 255)] * config.num_pixels
    population = max(1, config.popsize // genes)
    image = image.astype(np.float32)
    evaluated = [0]  # SciPy's nfev counts calls when vectorized, so count candidates here
    adversarial = [False]  # some candidate's argmax was wrong

    def objective(xs):  # xs [genes, n]
        applied = de.applied_pixels(xs.T, image.shape, config.round_rgb)  # [n, k, 5]
        n = applied.shape[0]
        evaluated[0] += n
        batch = np.repeat(image[None], n, axis=0)  # [n, H, W, 3]
        rows, cols = applied[..., 0].astype(np.intp), applied[..., 1].astype(np.intp)
        batch[np.arange(n)[:, None], rows, cols] = applied[..., 2:]
        probs = np.asarray(forward_probs(params, batch)[0])  # (probs, all finite)
        adversarial[0] |= bool(np.any(probs.argmax(-1) != true_label))
        return probs[:, true_label]

    started = time.perf_counter()
    result = differential_evolution(
        objective,
        bounds,
        maxiter=config.generations,
        popsize=population,
        recombination=1.0,
        mutation=(0.5, 1.0),
        polish=False,
        atol=-1,
        tol=0.0,
        vectorized=True,
        updating="deferred",
        rng=np.random.default_rng(seed),
    )
    wall = time.perf_counter() - started
    return {
        "seconds": wall,
        "queries": evaluated[0],
        "fun": float(result.fun),
        "success": adversarial[0],
    }


def run_scipy(model, config: de.DEConfig, workload: Workload, seed: int = 0) -> dict:
    forward_probs = attack.jitted_probs(model.apply_fn)
    params = jax.device_put(model.params)
    started, cpu = time.perf_counter(), time.process_time()
    runs = [
        scipy_attack(forward_probs, params, image, int(label), config, seed + i)
        for i, (image, label) in enumerate(zip(workload.images, workload.true_labels, strict=True))
    ]
    wall = time.perf_counter() - started
    queries = sum(r["queries"] for r in runs)
    return {
        "seconds": wall,
        "cpu_seconds": time.process_time() - cpu,
        "images": len(runs),
        "queries": queries,
        "queries_per_image": queries / max(len(runs), 1),
        "queries_per_s": queries / wall,
        "images_per_s": len(runs) / wall,
        "successes": sum(r["success"] for r in runs),
    }


def throughput_point(
    model,
    config: de.DEConfig,
    slots: int,
    workload: Workload,
    repetitions: int,
    loop_calls: int = 0,
) -> dict:
    """Forward ceilings and engine queries/s at one setting (early stop off), interleaved."""
    forward = Forward(model, slots * config.popsize, loop_calls=loop_calls)
    run_engine(model, config, slots, workload)  # compile and warm up
    ceiling, in_loop, engine_qps = [], [], []
    for _ in range(repetitions):
        ceiling.append(forward.time()["queries_per_s"])
        engine_qps.append(run_engine(model, config, slots, workload)["queries_per_s"])
        if loop_calls:
            in_loop.append(forward.time_loop()["queries_per_s"])
    row = {
        "forward_qps": spread(ceiling),
        "engine_qps": spread(engine_qps),
        "efficiency": spread(np.divide(engine_qps, ceiling)),
    }
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
    return [
        {
            "batch": b,
            "forward_qps": spread(qps[b]),
            "relative_to_first": spread(np.divide(qps[b], qps[first])),
        }
        for b in batches
    ]


class Evaluation:
    """One evaluator's logits for one slot of `popsize` candidates on every local device.

    Like `Forward.time_loop`: `loop_calls` evaluations in one jitted loop per
    timing, each on new candidates, on each device's own clean image, whose
    activation cache is computed once before the loop (as when an image
    enters its slot).
    """

    def __init__(
        self,
        model: LoadedModel,
        evaluator,
        popsize: int,
        num_pixels: int,
        loop_calls: int = 2,
        seed: int = 0,
    ):
        devices = jax.local_devices()
        mesh = Mesh(np.asarray(devices), ("data",))
        sharded = NamedSharding(mesh, P("data"))
        self.queries = popsize * len(devices) * loop_calls
        rng = np.random.default_rng(seed)
        images = random_images(len(devices), model.image_shape, seed).astype(np.float32)
        low, high = de.bounds(model.image_shape, num_pixels)
        unit = rng.random((len(devices), popsize, 5 * num_pixels))
        candidates = np.asarray(low + unit * (high - low), np.float32)
        self.params = jax.device_put(model.params, NamedSharding(mesh, P()))
        self.images = jax.device_put(images, sharded)  # [D, H, W, 3]
        self.candidates = jax.device_put(candidates, sharded)  # [D, popsize, genes]

        def loop(params, images, candidates):
            activations = evaluator.activations(params, images)

            def body(i, carry):
                candidates, total = carry
                candidates = candidates.at[:, i % popsize, 2].add(1.0)  # new candidates
                logits = evaluator.logits(params, activations, images, candidates, True)
                return candidates, total + jnp.sum(logits)

            return jax.lax.fori_loop(0, loop_calls, body, (candidates, 0.0))[1][None]

        self.loop = jax.jit(
            jax.shard_map(
                loop,
                mesh=mesh,
                in_specs=(P(), P("data"), P("data")),
                out_specs=P("data"),
                check_vma=False,
            )
        )
        jax.block_until_ready(self.loop(self.params, self.images, self.candidates))

    def time(self) -> float:
        """Queries per second of one timed loop."""
        started = time.perf_counter()
        jax.block_until_ready(self.loop(self.params, self.images, self.candidates))
        return self.queries / (time.perf_counter() - started)


def _traced(apply_fn, model: LoadedModel) -> str:
    """The jaxpr of `apply_fn` on one image, as text: equal for equal programs."""
    image = jax.ShapeDtypeStruct((1, *model.image_shape), jnp.float32)
    return str(jax.make_jaxpr(apply_fn)(model.params, image))


def evaluator_point(
    model: LoadedModel,
    num_pixels: int,
    popsize: int,
    repetitions: int,
    loop_calls: int = 2,
    seed: int = 0,
) -> dict:
    """Queries/s of the forward pass, the full and the incremental evaluator at one
    slot of `popsize` per device (interleaved repetitions), and of the incremental
    evaluator without its delta convolutions ("windows": every convolution from its
    patched region); for a model with convolutions on the valid-taps route, both
    evaluators without it too ("no_taps"); XLA's FLOPs and bytes per query of the full
    and incremental evaluators; the activation cache per in-flight image."""
    program = incremental.program_for(model.apply_fn, model.params, model.image_shape, num_pixels)
    windows = incremental.program_for(
        model.apply_fn, model.params, model.image_shape, num_pixels, delta_convolutions=False
    )
    evaluators = {
        "full": incremental.FullEvaluator(model.apply_fn),
        "incremental": incremental.IncrementalEvaluator(program),
        "windows": incremental.IncrementalEvaluator(windows),
    }
    # Models with convolutions on the valid-taps route (models.layers: VGG16's 4x4 and 2x2
    # maps) are also timed with those convolutions on their previous routes.
    plain_fn = layers.valid_taps_route(model.apply_fn, False)
    taps = _traced(layers.valid_taps_route(model.apply_fn, True), model) != _traced(plain_fn, model)
    if taps:
        plain = incremental.program_for(plain_fn, model.params, model.image_shape, num_pixels)
        evaluators["full_no_taps"] = incremental.FullEvaluator(plain_fn)
        evaluators["incremental_no_taps"] = incremental.IncrementalEvaluator(plain)
    forward = Forward(model, popsize, seed, loop_calls)
    runs = {
        name: Evaluation(model, e, popsize, num_pixels, loop_calls, seed)
        for name, e in evaluators.items()
    }
    rates = {"forward": [], **{name: [] for name in evaluators}}
    for _ in range(repetitions):
        rates["forward"].append(forward.time_loop()["queries_per_s"])
        for name, run in runs.items():
            rates[name].append(run.time())
    # Convolutions, and the matrix products that 1x1 convolutions become (models.layers).
    steps = [s for s in program.steps if s.primitive in ("conv_general_dilated", "dot_general")]
    valid_taps = {}
    if taps:
        valid_taps = {
            "no_taps_full_qps": spread(rates["full_no_taps"]),
            "no_taps_incremental_qps": spread(rates["incremental_no_taps"]),
            "valid_taps_speedup_full": spread(np.divide(rates["full"], rates["full_no_taps"])),
            "valid_taps_speedup_incremental": spread(
                np.divide(rates["incremental"], rates["incremental_no_taps"])
            ),
        }
    return {
        **valid_taps,
        "model": model.name,
        "trained": model.meta.get("trained", True),
        "image_shape": list(model.image_shape),
        "num_pixels": num_pixels,
        "popsize": popsize,
        "devices": len(jax.local_devices()),
        "forward_qps": spread(rates["forward"]),
        "full_qps": spread(rates["full"]),
        "incremental_qps": spread(rates["incremental"]),
        "speedup": spread(np.divide(rates["incremental"], rates["full"])),
        "speedup_over_forward": spread(np.divide(rates["incremental"], rates["forward"])),
        "windows_qps": spread(rates["windows"]),
        "speedup_over_windows": spread(np.divide(rates["incremental"], rates["windows"])),
        "costs_per_query": incremental.query_costs(model, num_pixels),
        "cache_bytes_per_image": incremental.cache_bytes(program),
        "convolutions_windowed": sum(s.mode == "window" for s in steps),
        "convolutions": len(steps),
        "auto": incremental.make_evaluator("auto", model, num_pixels).name,
    }
