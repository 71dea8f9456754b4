"""Measurements of the incremental evaluator against the full forward pass.

Kept apart from `opa_jax.benchmark` until that module's reshaping (issue 12)
lands; `scripts/bench_incremental.py` prints them. Everything here returns
numbers; nothing renders tables but `markdown`.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from opa_jax import de, incremental


class Evaluation:
    """One evaluator's logits for one slot of `popsize` candidates on every local device.

    Like the benchmark's in-loop forward ceiling: `loop_calls` evaluations in
    one jitted loop per timing, each on new candidates, on each device's own
    clean image, whose activation cache is computed before the timing.
    """

    def __init__(self, model, evaluator, popsize: int, num_pixels: int, loop_calls: int = 2,
                 seed: int = 0):  # fmt: skip
        devices = jax.local_devices()
        mesh = Mesh(np.asarray(devices), ("data",))
        sharded = NamedSharding(mesh, P("data"))
        self.queries = popsize * len(devices) * loop_calls
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, (len(devices), *model.image_shape)).astype(np.float32)
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

        self.loop = jax.jit(jax.shard_map(
            loop, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P("data"),
            check_vma=False,
        ))  # fmt: skip
        jax.block_until_ready(self.loop(self.params, self.images, self.candidates))

    def time(self) -> float:
        """Queries per second of one timed loop."""
        started = time.perf_counter()
        jax.block_until_ready(self.loop(self.params, self.images, self.candidates))
        return self.queries / (time.perf_counter() - started)


def evaluator_comparison(model, num_pixels: int = 1, popsize: int = 400, repetitions: int = 3,
                         loop_calls: int = 2) -> dict:  # fmt: skip
    """Queries/s of both evaluators (interleaved repetitions), their FLOPs per query,
    the activation cache per in-flight image and what the incremental pass windows."""
    program = incremental.program_for(model.apply_fn, model.params, model.image_shape, num_pixels)
    evaluators = {
        "full": incremental.FullEvaluator(model.apply_fn),
        "incremental": incremental.IncrementalEvaluator(program),
    }
    runs = {name: Evaluation(model, ev, popsize, num_pixels, loop_calls)
            for name, ev in evaluators.items()}  # fmt: skip
    rates = {name: [] for name in runs}
    for _ in range(repetitions):
        for name, run in runs.items():
            rates[name].append(run.time())
    speedups = [i / f for i, f in zip(rates["incremental"], rates["full"], strict=True)]
    steps = [s for s in program.steps if s.primitive == "conv_general_dilated"]
    return {
        "model": model.name,
        "num_pixels": num_pixels,
        "popsize": popsize,
        "devices": len(jax.local_devices()),
        "queries_per_s": {name: float(np.median(r)) for name, r in rates.items()},
        "queries_per_s_all": rates,
        "speedup": float(np.median(speedups)),
        "speedup_range": [float(min(speedups)), float(max(speedups))],
        "flops_per_query": incremental.flops_per_query(model, num_pixels),
        "cache_bytes_per_image": incremental.cache_bytes(program),
        "convolutions_windowed": sum(s.mode == "window" for s in steps),
        "convolutions": len(steps),
        "auto": incremental.make_evaluator("auto", model, num_pixels).name,
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | pixels | devices x batch | full (q/s) | incremental (q/s) | speed-up "
        "[min, max] | GFLOP per query, full / incremental | convs on windows | "
        "cache per image | auto |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flops = r["flops_per_query"]
        lines.append(
            f"| {r['model']} | {r['num_pixels']} | {r['devices']} x {r['popsize']} | "
            f"{r['queries_per_s']['full']:.1f} | {r['queries_per_s']['incremental']:.1f} | "
            f"**{r['speedup']:.2f}** [{r['speedup_range'][0]:.2f}, {r['speedup_range'][1]:.2f}] | "
            f"{flops['full'] / 1e9:.4f} / {flops['incremental'] / 1e9:.4f} "
            f"({flops['full'] / flops['incremental']:.2f}x) | "
            f"{r['convolutions_windowed']} of {r['convolutions']} | "
            f"{r['cache_bytes_per_image'] / 2**20:.2f} MiB | {r['auto']} |"
        )
    return "\n".join(lines)
