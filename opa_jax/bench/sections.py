"""The benchmark as a table of sections, each measuring one thing into the report.

`benchmark(config, workdir)` runs the `SECTIONS` its config enables, in order,
and writes the report (`opa_jax.bench.markdown`). The main section times the
forward ceiling, the engine (early stop off, with `config.evaluator`) and the
SciPy baseline, interleaved; later sections reuse its runs through the shared
`Bench`. The `incremental` section compares the evaluators model by model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from opa_jax import attack, de, devices, incremental, plan, profiling, provenance
from opa_jax.bench import children, costs, markdown, measure
from opa_jax.models import LoadedModel, load_model


@dataclasses.dataclass
class Bench:
    """What the sections share: the settings, and runs that later sections reuse."""

    config: ml_collections.ConfigDict
    workdir: str
    model: LoadedModel
    throughput: de.DEConfig  # the configured DE with early stop off
    slots: int  # per device
    workload: measure.Workload  # every image a section attacks
    main: measure.Workload  # the main section's images
    chunk: int  # queue items per device holding `main` in one device call
    log: Callable[[str], object]
    evaluator: object = "full"  # the main section's engine evaluator (config.evaluator)
    model16: LoadedModel | None = None  # the bfloat16 model, when the bf16 section runs
    # Set by the main section.
    engines: list[dict] = dataclasses.field(default_factory=list)  # engine runs
    ceilings: list[float] = dataclasses.field(default_factory=list)  # each run's ceiling, q/s
    ceilings_in_loop: list[float] | None = None  # the same, from the forward pass in a loop
    forward16_qps: list[float] = dataclasses.field(default_factory=list)
    # Set by the early-stop section.
    stop_config: de.DEConfig | None = None
    early: measure.Workload | None = None
    early_runs: list[dict] = dataclasses.field(default_factory=list)

    @property
    def bf16(self) -> bool:
        return self.model16 is not None


def harmonic_around(timings: list[dict]) -> list[float]:
    """The ceiling of each run between two forward timings: their rates as one rate."""
    return [2.0 / (1.0 / a["queries_per_s"] + 1.0 / b["queries_per_s"])
            for a, b in zip(timings[:-1], timings[1:], strict=True)]  # fmt: skip


def main_section(bench: Bench) -> dict:
    """Forward ceiling, engine (early stop off) and the SciPy baseline, interleaved:
    forward, engine, baseline, forward, engine, ... so that every engine run lies
    between two forward timings, whose harmonic mean is its ceiling."""
    config, model, throughput, slots, main = (
        bench.config, bench.model, bench.throughput, bench.slots, bench.main,
    )  # fmt: skip
    forward = measure.Forward(model, slots * throughput.popsize, config.seed,
                              config.forward_loop_calls)  # fmt: skip
    if bench.bf16:
        forward16 = measure.Forward(bench.model16, forward.batch, config.seed)
    measure.run_engine(model, throughput, slots, main.take(1), config.seed, chunk=bench.chunk,
                       evaluator=bench.evaluator)  # fmt: skip
    baseline_images = bench.workload.take(config.baseline.num_images)
    if config.baseline.enabled:  # compile
        measure.run_scipy(model, dataclasses.replace(throughput, generations=0),
                          baseline_images.take(1))  # fmt: skip
    ceilings, loops = [forward.time()], [forward.time_loop()]
    engines, baselines = [], []
    for r in range(config.repetitions):
        engines.append(measure.run_engine(model, throughput, slots, main, config.seed,
                                          evaluator=bench.evaluator))  # fmt: skip
        if config.baseline.enabled:
            baselines.append(measure.run_scipy(model, throughput, baseline_images, config.seed))
        if bench.bf16:
            bench.forward16_qps.append(forward16.time()["queries_per_s"])
        ceilings.append(forward.time())
        loops.append(forward.time_loop())
        scipy = f", scipy {baselines[-1]['queries_per_s']:.1f} q/s" if baselines else ""
        bench.log(f"repetition {r}: forward {ceilings[-1]['queries_per_s']:.1f} q/s, "
                  f"engine {engines[-1]['queries_per_s']:.1f} q/s{scipy}")  # fmt: skip
    bench.engines = engines
    bench.ceilings = harmonic_around(ceilings)
    bench.ceilings_in_loop = harmonic_around(loops) if forward.loop_calls else None
    ceilings_cpu = [2.0 * forward.queries / (a["cpu_seconds"] + b["cpu_seconds"])
                    for a, b in zip(ceilings[:-1], ceilings[1:], strict=True)]  # fmt: skip
    spread = measure.spread
    report = {
        "forward_ceiling": {
            "batch": forward.batch,
            "queries_per_call": forward.queries,
            "queries_per_s": spread([c["queries_per_s"] for c in ceilings]),
            "queries_per_cpu_s": spread([forward.queries / c["cpu_seconds"] for c in ceilings]),
        },
        "engine": {
            "evaluator": getattr(bench.evaluator, "name", bench.evaluator),
            "images": len(main.images),
            "generations": throughput.generations,
            "queries_per_s": spread([e["queries_per_s"] for e in engines]),
            "images_per_s": spread([e["images_per_s"] for e in engines]),
            "queries_per_cpu_s": spread(
                [e["active_evaluations"] / e["cpu_seconds"] for e in engines]
            ),
            "runs": [{k: v for k, v in e.items() if k != "success_by_work_id"} for e in engines],
        },
        "efficiency": spread(
            [e["queries_per_s"] / c for e, c in zip(engines, bench.ceilings, strict=True)]
        ),
    }
    if bench.ceilings_in_loop:
        report["forward_ceiling"]["in_loop_calls"] = forward.loop_calls
        report["forward_ceiling"]["in_loop_queries_per_s"] = spread(
            [c["queries_per_s"] for c in loops]
        )
        report["efficiency_in_loop"] = spread(
            [e["queries_per_s"] / c for e, c in zip(engines, bench.ceilings_in_loop, strict=True)]
        )
    report["efficiency_cpu_time"] = spread(
        [(e["active_evaluations"] / e["cpu_seconds"]) / c
         for e, c in zip(engines, ceilings_cpu, strict=True)]
    )  # fmt: skip
    if baselines:
        report["scipy_baseline"] = {
            "images": len(baseline_images.images),
            "queries_per_image": baselines[0]["queries_per_image"],
            "engine_queries_per_image": engines[0]["evaluations"] / len(main.images),
            "queries_per_s": spread([b["queries_per_s"] for b in baselines]),
            "images_per_s": spread([b["images_per_s"] for b in baselines]),
            "speedup_images_per_s": spread([e["images_per_s"] / b["images_per_s"]
                                            for e, b in zip(engines, baselines, strict=True)]),
        }  # fmt: skip
    return report


def breakdown_section(bench: Bench) -> dict:
    """Where the engine's wall time goes (`costs.breakdown`), median over the runs."""
    config, model, throughput, slots, main = (
        bench.config, bench.model, bench.throughput, bench.slots, bench.main,
    )  # fmt: skip
    parts = costs.step_parts(model, throughput, slots, main)
    trivial = costs.trivial_model(model)
    measure.run_engine(trivial, throughput, slots, main, config.seed)  # compile
    trivial_run = measure.run_engine(trivial, throughput, slots, main, config.seed)
    # Against the in-loop ceiling where measured: it calls the model as the engine does.
    shares = [costs.breakdown(e, c, parts, trivial_run)
              for e, c in zip(bench.engines, bench.ceilings_in_loop or bench.ceilings,
                              strict=True)]  # fmt: skip
    section = {
        name: measure.spread([s[name] for s in shares])["median"]
        for name in ("efficiency", "accounted_efficiency", "idle_slots", "de_step", "perturb",
                     "host", "other", "idle_share_of_evaluations")
    }  # fmt: skip
    section["seconds_per_generation"] = {
        name: float(np.median([s["seconds_per_generation"][name] for s in shares]))
        for name in shares[0]["seconds_per_generation"]
    }
    section["trivial_model_queries_per_s"] = trivial_run["queries_per_s"]
    section["ceiling"] = "in_loop" if bench.ceilings_in_loop else "one_call"
    return {"breakdown": section}


def profile_section(bench: Bench) -> dict:
    """One engine run under jax.profiler: device self time per XLA operation."""
    config = bench.config
    profiled, trace_file, wall = profiling.trace(
        lambda: measure.run_engine(bench.model, bench.throughput, bench.slots, bench.main,
                                   config.seed),
        os.path.join(bench.workdir, "profile"),
    )  # fmt: skip
    table = profiling.op_table(trace_file, config.profile.top)
    return {
        "profile": {
            **table,
            "wall_seconds": wall,
            "engine_queries_per_s": profiled["queries_per_s"],
            # On a CPU: the cores busy on average; on an accelerator, the streams.
            "mean_operations_running": table["device_seconds"] / wall,
        }
    }


def early_stop_section(bench: Bench) -> dict:
    """The engine with the configured stop rule, on real images where available."""
    config = bench.config
    bench.stop_config = plan.de_config(config, generations=config.early_stop.generations or None)
    bench.early = bench.workload.take(config.early_stop.num_images)
    num_devices = len(jax.local_devices())
    measure.run_engine(bench.model, bench.stop_config, bench.slots, bench.early.take(1),
                       config.seed, chunk=measure.whole_chunk(len(bench.early.images),
                                                              num_devices))  # fmt: skip
    runs = [measure.run_engine(bench.model, bench.stop_config, bench.slots, bench.early,
                               config.seed)
            for _ in range(config.early_stop.repetitions)]  # fmt: skip
    bench.early_runs = runs
    return {
        "early_stop": {
            "stop": bench.stop_config.stop,
            "generations": bench.stop_config.generations,
            "images": len(bench.early.images),
            "successes": runs[0]["successes"],
            "mean_queries": runs[0]["mean_queries"],
            "queries_per_s": measure.spread([r["queries_per_s"] for r in runs]),
            "images_per_s": measure.spread([r["images_per_s"] for r in runs]),
            "idle_share_of_evaluations": measure.spread(
                [1 - r["active_evaluations"] / r["evaluations"] for r in runs]
            ),
            "device_calls": runs[0]["device_calls"],
        }
    }


def bf16_section(bench: Bench) -> dict:
    """bfloat16 forward passes: speed, and success on the same images and seed."""
    config, model, model16 = bench.config, bench.model, bench.model16
    clean32 = attack.predict_probs(model, bench.workload.images)
    clean16 = attack.predict_probs(model16, bench.workload.images)
    section = {
        "forward_qps_bf16": measure.spread(bench.forward16_qps),
        "forward_speedup": measure.spread(np.divide(bench.forward16_qps, bench.ceilings)),
        "clean_max_abs_prob_diff": float(np.max(np.abs(clean32 - clean16))),
        "clean_argmax_agreement": float(np.mean(clean32.argmax(-1) == clean16.argmax(-1))),
        "clean_images": len(bench.workload.images),
    }
    if config.bf16.engine_repetitions:
        engine = lambda m: measure.run_engine(m, bench.throughput, bench.slots, bench.main,
                                              config.seed)["queries_per_s"]  # fmt: skip
        measure.run_engine(model16, bench.throughput, bench.slots, bench.main.take(1),
                           config.seed, chunk=bench.chunk)  # fmt: skip
        pairs = [(engine(model16), engine(model)) for _ in range(config.bf16.engine_repetitions)]
        section["engine_qps_bf16"] = measure.spread([a for a, _ in pairs])
        section["engine_speedup"] = measure.spread([a / b for a, b in pairs])
    if bench.stop_config is not None:
        early16 = measure.run_engine(model16, bench.stop_config, bench.slots, bench.early,
                                     config.seed)  # fmt: skip
        early32 = bench.early_runs[0]
        n = len(bench.early.images)
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
    return {"bf16": section}


def memory_section(bench: Bench) -> dict:
    """Device memory per in-flight image."""
    counts = sorted({*bench.config.memory.slots, bench.slots})
    return {"memory": costs.memory(bench.model, bench.throughput, counts, bench.chunk,
                                   costs.device_peak_bytes())}  # fmt: skip


def scaling_section(bench: Bench) -> dict:
    """Throughput along slots, population and pixels, then image size and batch size."""
    config, sc, throughput = bench.config, bench.config.scaling, bench.throughput
    num_devices = len(jax.local_devices())
    points = {}

    def point(slots, popsize, pixels):
        if (slots, popsize, pixels) in points:  # the base setting recurs on every axis
            return points[slots, popsize, pixels]
        dconf = dataclasses.replace(
            throughput, popsize=popsize, num_pixels=pixels, generations=sc.generations
        )
        images = bench.workload.take(slots * num_devices)  # a full wave of slots on every device
        row = measure.throughput_point(bench.model, dconf, slots, images, sc.repetitions,
                                       sc.forward_loop_calls)  # fmt: skip
        bench.log(f"scaling slots={slots} popsize={popsize} pixels={pixels}: "
                  f"engine {row['engine_qps']['median']:.1f} q/s, "
                  f"efficiency {row['efficiency']['median']:.3f}")  # fmt: skip
        points[slots, popsize, pixels] = {"slots": slots, "popsize": popsize, "pixels": pixels,
                                          "batch": slots * popsize, **row}  # fmt: skip
        return points[slots, popsize, pixels]

    base = dict(slots=bench.slots, popsize=throughput.popsize, pixels=throughput.num_pixels)
    scaling = {name: [point(**(base | {name: v})) for v in values]
               for name, values in (("slots", sc.slots), ("popsize", sc.popsize),
                                    ("pixels", sc.pixels))}  # fmt: skip
    rows = []
    for spec in sc.image_models:
        other = load_model(spec).with_precision(config.precision)
        dconf = dataclasses.replace(throughput, popsize=sc.image_popsize,
                                    generations=sc.image_generations)  # fmt: skip
        count = sc.image_slots * num_devices  # a full wave of slots on every device
        images = measure.Workload(measure.random_images(count, other.image_shape, config.seed),
                                  np.zeros(count, np.int32), np.arange(count),
                                  "random")  # fmt: skip
        row = measure.throughput_point(other, dconf, sc.image_slots, images, sc.repetitions,
                                       sc.forward_loop_calls)  # fmt: skip
        bench.log(f"scaling {spec}: engine {row['engine_qps']['median']:.1f} q/s")
        rows.append({"model": spec, "image_shape": list(other.image_shape),
                     "trained": other.meta.get("trained", True), "slots": sc.image_slots,
                     "popsize": sc.image_popsize, **row})  # fmt: skip
    scaling["image_size"] = rows
    if sc.forward_batches:
        scaling["forward_batches"] = measure.forward_sweep(
            bench.model, list(sc.forward_batches), sc.forward_rounds, config.seed
        )
    return {"scaling": scaling}


def devices_section(bench: Bench) -> dict:
    """The engine on 1, 2, ... forced host devices, one process each."""
    sc = bench.config.scaling
    rows = children.device_scaling(bench.config.model, bench.config, sc.devices,
                                   sc.device_slots, sc.generations, sc.repetitions)  # fmt: skip
    return {"scaling": {"devices": rows}}


def xla_flags_section(bench: Bench) -> dict:
    """Forward and engine under each XLA_FLAGS setting, one process each."""
    xf = bench.config.xla_flags
    bench.log("XLA flags: forward and engine under each flag set, one process each")
    return {"xla_flags": children.xla_flag_comparison(
        bench.config.model, bench.config, list(xf.flag_sets), xf.slots or bench.slots,
        xf.generations, xf.rounds, xf.forward_loop_calls,
    )}  # fmt: skip


def incremental_section(bench: Bench) -> dict:
    """The incremental evaluator against the full one and the forward pass, per model
    and pixel count (`measure.evaluator_point`): queries/s at the same batch and
    device count, XLA's FLOPs and bytes per query, the activation cache per image."""
    ic = bench.config.incremental
    popsize = ic.popsize or bench.throughput.popsize
    rows = []
    for spec in ic.models:
        model = load_model(spec).with_precision(bench.config.precision)
        pixels = sorted({*ic.pixels, *(ic.more_pixels if spec in ic.more_pixels_models else ())})
        for num_pixels in pixels:
            row = measure.evaluator_point(model, num_pixels, popsize, ic.repetitions,
                                          ic.loop_calls, bench.config.seed)  # fmt: skip
            row["spec"] = spec
            bench.log(f"incremental {spec} k={num_pixels}: full {row['full_qps']['median']:.1f}"
                      f" q/s, incremental {row['incremental_qps']['median']:.1f} q/s, "
                      f"speed-up {row['speedup']['median']:.2f}; without delta convolutions "
                      f"{row['windows_qps']['median']:.1f} q/s")  # fmt: skip
            if "valid_taps_speedup_full" in row:
                bench.log(f"incremental {spec} k={num_pixels}: valid taps' speed-up, full "
                          f"{row['valid_taps_speedup_full']['median']:.2f}, incremental "
                          f"{row['valid_taps_speedup_incremental']['median']:.2f}")  # fmt: skip
            rows.append(row)
    return {"incremental": rows}


@dataclasses.dataclass(frozen=True)
class Section:
    name: str  # its entry in the report's section_seconds
    enabled: Callable[[ml_collections.ConfigDict], bool]
    measure: Callable[[Bench], dict]  # -> report fields (a dict field is merged into one)


def _on(config, name: str) -> bool:
    section = config.get(name)
    return section is not None and bool(section.enabled)


def bf16_enabled(config) -> bool:
    """bfloat16 is compared with float32, so only from a float32 config."""
    return _on(config, "bf16") and config.precision == "float32"


SECTIONS = (
    Section("main", lambda config: True, main_section),
    Section("breakdown", lambda config: bool(config.breakdown), breakdown_section),
    Section("profile", lambda config: _on(config, "profile"), profile_section),
    Section("early_stop", lambda config: _on(config, "early_stop"), early_stop_section),
    Section("bf16", lambda config: bf16_enabled(config), bf16_section),
    Section("memory", lambda config: _on(config, "memory"), memory_section),
    Section("scaling", lambda config: _on(config, "scaling"), scaling_section),
    Section("devices", lambda c: _on(c, "scaling") and bool(c.scaling.devices), devices_section),
    Section("xla_flags", lambda config: _on(config, "xla_flags"), xla_flags_section),
    Section("incremental", lambda config: _on(config, "incremental"), incremental_section),
)


def benchmark(config: ml_collections.ConfigDict, workdir: str, out: str = "",
              model: LoadedModel | None = None, log=print) -> dict:  # fmt: skip
    """Runs every enabled section; writes JSON and appends a Markdown report.

    `model` replaces `config.model` (tests pass an in-memory model). Returns the report.
    """
    started = time.perf_counter()
    model = (model or load_model(config.model)).with_precision(config.precision)
    throughput = plan.de_config(config, stop="none")
    evaluator = incremental.make_evaluator(
        config.get("evaluator", "full"), model, throughput.num_pixels
    )
    slots = config.slots or devices.auto_slots(model, throughput.popsize, evaluator)
    log(f"model {model.name}, {slots} slots x popsize {throughput.popsize}, "
        f"{evaluator.name} evaluator")  # fmt: skip
    workload = measure.load_workload(
        model, config, max(config.num_images, config.early_stop.num_images)
    )
    main = workload.take(config.num_images)
    bench = Bench(
        config=config, workdir=workdir, model=model, throughput=throughput, slots=slots,
        workload=workload, main=main, log=log, evaluator=evaluator,
        chunk=measure.whole_chunk(len(main.images), len(jax.local_devices())),
        model16=model.with_precision("bfloat16") if bf16_enabled(config) else None,
    )  # fmt: skip
    report = {
        "machine": provenance.machine(),
        "model": {"name": model.name, "image_shape": list(model.image_shape),
                  "num_classes": model.num_classes, "trained": model.meta.get("trained", True),
                  "parameters": int(sum(np.size(x) for x in jax.tree.leaves(model.params)))},
        "config": json.loads(config.to_json()),
        "de": dataclasses.asdict(throughput),
        "slots": slots,
        "batch": slots * throughput.popsize,
        "images": workload.source,
    }  # fmt: skip
    section_seconds = {}
    for section in SECTIONS:
        if section.enabled(config):
            for field, value in section.measure(bench).items():
                if isinstance(value, dict) and isinstance(report.get(field), dict):
                    report[field].update(value)
                else:
                    report[field] = value
            section_seconds[section.name] = (
                time.perf_counter() - started - sum(section_seconds.values())
            )
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    report["section_seconds"] = section_seconds
    report["wall_seconds"] = time.perf_counter() - started
    markdown.write_report(report, workdir, out)
    return report
