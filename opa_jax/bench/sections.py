"""The benchmark as a table of sections, each measuring one thing into the report.

`benchmark(config, workdir)` runs the `SECTIONS` its config enables, in order,
and writes the report (`opa_jax.bench.markdown`). Every section is a function of
the `Setting` (the model, DE settings, slots and images, fixed before the first
section) and of the runs of the sections it names in `needs`, which `benchmark`
passes by name. The main section times the forward ceiling, the engine (early
stop off, with `config.evaluator`) and the SciPy baseline, interleaved, and gives
its runs (`MainRuns`) to the breakdown and bf16 sections; the early-stop section
gives its runs to the bf16 section. The `incremental` section compares the
evaluators model by model.
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

from opa_jax import attack, de, devices, exhaustive, incremental, plan, profiling, provenance
from opa_jax.bench import children, costs, markdown, measure
from opa_jax.models import LoadedModel, load_model


@dataclasses.dataclass(frozen=True)
class Setting:
    """What every section reads, fixed before the first one runs."""

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


@dataclasses.dataclass(frozen=True)
class MainRuns:
    """The main section's engine runs and their ceilings, for the sections after it."""

    engines: list[dict]  # engine runs (early stop off)
    ceilings: list[float]  # each run's ceiling, q/s
    ceilings_in_loop: list[float] | None  # the same, from the forward pass in a loop
    forward16_qps: list[float]  # bfloat16 forward passes, timed beside them (bf16 on)


@dataclasses.dataclass(frozen=True)
class EarlyStopRuns:
    """The early-stop section's runs, for the bf16 section's success comparison."""

    stop_config: de.DEConfig
    workload: measure.Workload
    runs: list[dict]


def harmonic_around(timings: list[dict]) -> list[float]:
    """The ceiling of each run between two forward timings: their rates as one rate."""
    return [
        2.0 / (1.0 / a["queries_per_s"] + 1.0 / b["queries_per_s"])
        for a, b in zip(timings[:-1], timings[1:], strict=True)
    ]


def main_section(setting: Setting) -> tuple[dict, MainRuns]:
    """Forward ceiling, engine (early stop off) and the SciPy baseline, interleaved:
    forward, engine, baseline, forward, engine, ... so that every engine run lies
    between two forward timings, whose harmonic mean is its ceiling."""
    config, throughput = setting.config, setting.throughput
    forward = measure.Forward(
        setting.model, setting.slots * throughput.popsize, config.seed, config.forward_loop_calls
    )
    baseline_images = setting.workload.take(config.baseline.num_images)
    timings = _interleaved_runs(setting, forward, baseline_images)
    runs = MainRuns(
        engines=timings["engines"],
        ceilings=harmonic_around(timings["ceilings"]),
        ceilings_in_loop=harmonic_around(timings["loops"]) if forward.loop_calls else None,
        forward16_qps=timings["forward16_qps"],
    )
    return _main_report(setting, forward, timings, runs, baseline_images), runs


def _interleaved_runs(
    setting: Setting, forward: measure.Forward, baseline_images: measure.Workload
) -> dict[str, list]:
    """The main section's timings, after compiling each: forward passes (one call and
    in a loop) around every repetition of the engine, SciPy and bfloat16 runs."""
    config, model, throughput = setting.config, setting.model, setting.throughput
    slots = setting.slots
    if setting.model16 is not None:
        forward16 = measure.Forward(setting.model16, forward.batch, config.seed)
    measure.run_engine(
        model,
        throughput,
        slots,
        setting.main.take(1),
        config.seed,
        chunk=setting.chunk,
        evaluator=setting.evaluator,
    )
    if config.baseline.enabled:  # compile
        measure.run_scipy(
            model, dataclasses.replace(throughput, generations=0), baseline_images.take(1)
        )
    timings = {
        "ceilings": [forward.time()],
        "loops": [forward.time_loop()],
        "engines": [],
        "baselines": [],
        "forward16_qps": [],
    }
    for r in range(config.repetitions):
        engine = measure.run_engine(
            model, throughput, slots, setting.main, config.seed, evaluator=setting.evaluator
        )
        timings["engines"].append(engine)
        if config.baseline.enabled:
            timings["baselines"].append(
                measure.run_scipy(model, throughput, baseline_images, config.seed)
            )
        if setting.model16 is not None:
            timings["forward16_qps"].append(forward16.time()["queries_per_s"])
        timings["ceilings"].append(forward.time())
        timings["loops"].append(forward.time_loop())
        baselines = timings["baselines"]
        scipy = f", scipy {baselines[-1]['queries_per_s']:.1f} q/s" if baselines else ""
        setting.log(
            f"repetition {r}: forward {timings['ceilings'][-1]['queries_per_s']:.1f} q/s, "
            f"engine {engine['queries_per_s']:.1f} q/s{scipy}"
        )
    return timings


def _main_report(
    setting: Setting,
    forward: measure.Forward,
    timings: dict[str, list],
    runs: MainRuns,
    baseline_images: measure.Workload,
) -> dict:
    """The main section's report fields from its timings."""
    spread = measure.spread
    ceilings, loops, engines = timings["ceilings"], timings["loops"], runs.engines
    report = {
        "forward_ceiling": {
            "batch": forward.batch,
            "queries_per_call": forward.queries,
            "queries_per_s": spread([c["queries_per_s"] for c in ceilings]),
            "queries_per_cpu_s": spread([forward.queries / c["cpu_seconds"] for c in ceilings]),
        },
        "engine": {
            "evaluator": getattr(setting.evaluator, "name", setting.evaluator),
            "images": len(setting.main.images),
            "generations": setting.throughput.generations,
            "queries_per_s": spread([e["queries_per_s"] for e in engines]),
            "images_per_s": spread([e["images_per_s"] for e in engines]),
            "queries_per_cpu_s": spread(
                [e["active_evaluations"] / e["cpu_seconds"] for e in engines]
            ),
            "runs": [{k: v for k, v in e.items() if k != "success_by_work_id"} for e in engines],
        },
        "efficiency": spread(
            [e["queries_per_s"] / c for e, c in zip(engines, runs.ceilings, strict=True)]
        ),
    }
    if runs.ceilings_in_loop:
        report["forward_ceiling"]["in_loop_calls"] = forward.loop_calls
        report["forward_ceiling"]["in_loop_queries_per_s"] = spread(
            [c["queries_per_s"] for c in loops]
        )
        report["efficiency_in_loop"] = spread(
            [e["queries_per_s"] / c for e, c in zip(engines, runs.ceilings_in_loop, strict=True)]
        )
    ceilings_cpu = [
        2.0 * forward.queries / (a["cpu_seconds"] + b["cpu_seconds"])
        for a, b in zip(ceilings[:-1], ceilings[1:], strict=True)
    ]
    report["efficiency_cpu_time"] = spread(
        [
            (e["active_evaluations"] / e["cpu_seconds"]) / c
            for e, c in zip(engines, ceilings_cpu, strict=True)
        ]
    )
    baselines = timings["baselines"]
    if baselines:
        report["scipy_baseline"] = {
            "images": len(baseline_images.images),
            "queries_per_image": baselines[0]["queries_per_image"],
            "engine_queries_per_image": engines[0]["evaluations"] / len(setting.main.images),
            "queries_per_s": spread([b["queries_per_s"] for b in baselines]),
            "images_per_s": spread([b["images_per_s"] for b in baselines]),
            "speedup_images_per_s": spread(
                [
                    e["images_per_s"] / b["images_per_s"]
                    for e, b in zip(engines, baselines, strict=True)
                ]
            ),
        }
    return report


def breakdown_section(setting: Setting, main: MainRuns) -> dict:
    """Where the main section's engine wall time goes (`costs.breakdown`), median over
    its runs."""
    config, model, throughput = setting.config, setting.model, setting.throughput
    slots = setting.slots
    parts = costs.step_parts(model, throughput, slots, setting.main)
    trivial = costs.trivial_model(model)
    measure.run_engine(trivial, throughput, slots, setting.main, config.seed)  # compile
    trivial_run = measure.run_engine(trivial, throughput, slots, setting.main, config.seed)
    # Against the in-loop ceiling where measured: it calls the model as the engine does.
    ceilings = main.ceilings_in_loop or main.ceilings
    shares = [
        costs.breakdown(e, c, parts, trivial_run)
        for e, c in zip(main.engines, ceilings, strict=True)
    ]
    names = (
        "efficiency",
        "accounted_efficiency",
        "idle_slots",
        "de_step",
        "perturb",
        "host",
        "other",
        "idle_share_of_evaluations",
    )
    section = {name: measure.spread([s[name] for s in shares])["median"] for name in names}
    section["seconds_per_generation"] = {
        name: float(np.median([s["seconds_per_generation"][name] for s in shares]))
        for name in shares[0]["seconds_per_generation"]
    }
    section["trivial_model_queries_per_s"] = trivial_run["queries_per_s"]
    section["ceiling"] = "in_loop" if main.ceilings_in_loop else "one_call"
    return {"breakdown": section}


def profile_section(setting: Setting) -> dict:
    """One engine run under jax.profiler: device self time per XLA operation."""
    config = setting.config
    profiled, trace_file, wall = profiling.trace(
        lambda: measure.run_engine(
            setting.model, setting.throughput, setting.slots, setting.main, config.seed
        ),
        os.path.join(setting.workdir, "profile"),
    )
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


def early_stop_section(setting: Setting) -> tuple[dict, EarlyStopRuns]:
    """The engine with the configured stop rule, on real images where available."""
    config = setting.config
    stop_config = plan.de_config(config, generations=config.early_stop.generations or None)
    early = setting.workload.take(config.early_stop.num_images)
    chunk = measure.whole_chunk(len(early.images), len(jax.local_devices()))
    measure.run_engine(
        setting.model, stop_config, setting.slots, early.take(1), config.seed, chunk=chunk
    )
    runs = [
        measure.run_engine(setting.model, stop_config, setting.slots, early, config.seed)
        for _ in range(config.early_stop.repetitions)
    ]
    section = {
        "stop": stop_config.stop,
        "generations": stop_config.generations,
        "images": len(early.images),
        "successes": runs[0]["successes"],
        "mean_queries": runs[0]["mean_queries"],
        "queries_per_s": measure.spread([r["queries_per_s"] for r in runs]),
        "images_per_s": measure.spread([r["images_per_s"] for r in runs]),
        "idle_share_of_evaluations": measure.spread(
            [1 - r["active_evaluations"] / r["evaluations"] for r in runs]
        ),
        "device_calls": runs[0]["device_calls"],
    }
    return {"early_stop": section}, EarlyStopRuns(stop_config, early, runs)


def bf16_section(setting: Setting, main: MainRuns, early_stop: EarlyStopRuns | None) -> dict:
    """bfloat16 forward passes: speed (timed beside the main section's float32 ones),
    and success on the early-stop section's images and seed when it ran."""
    config, model, model16 = setting.config, setting.model, setting.model16
    clean32 = attack.predict_probs(model, setting.workload.images)
    clean16 = attack.predict_probs(model16, setting.workload.images)
    section = {
        "forward_qps_bf16": measure.spread(main.forward16_qps),
        "forward_speedup": measure.spread(np.divide(main.forward16_qps, main.ceilings)),
        "clean_max_abs_prob_diff": float(np.max(np.abs(clean32 - clean16))),
        "clean_argmax_agreement": float(np.mean(clean32.argmax(-1) == clean16.argmax(-1))),
        "clean_images": len(setting.workload.images),
    }
    if config.bf16.engine_repetitions:
        section.update(_bf16_engine(setting))
    if early_stop is not None:
        section.update(_bf16_successes(setting, early_stop))
    return {"bf16": section}


def _bf16_engine(setting: Setting) -> dict:
    """The engine's queries/s in bfloat16 and float32, alternating."""
    config = setting.config

    def engine(model):
        run = measure.run_engine(
            model, setting.throughput, setting.slots, setting.main, config.seed
        )
        return run["queries_per_s"]

    measure.run_engine(
        setting.model16,
        setting.throughput,
        setting.slots,
        setting.main.take(1),
        config.seed,
        chunk=setting.chunk,
    )
    pairs = [
        (engine(setting.model16), engine(setting.model))
        for _ in range(config.bf16.engine_repetitions)
    ]
    return {
        "engine_qps_bf16": measure.spread([a for a, _ in pairs]),
        "engine_speedup": measure.spread([a / b for a, b in pairs]),
    }


def _bf16_successes(setting: Setting, early_stop: EarlyStopRuns) -> dict:
    """The early-stop run in bfloat16 against the float32 one: successes and outcomes."""
    early16 = measure.run_engine(
        setting.model16,
        early_stop.stop_config,
        setting.slots,
        early_stop.workload,
        setting.config.seed,
    )
    early32 = early_stop.runs[0]
    n = len(early_stop.workload.images)
    p = (early32["successes"] + early16["successes"]) / (2 * n)
    same = np.equal(early32["success_by_work_id"], early16["success_by_work_id"])
    return {
        "success_images": n,
        "successes_float32": early32["successes"],
        "successes_bf16": early16["successes"],
        "same_outcome_share": float(np.mean(same)),
        "early_stop_qps_bf16": early16["queries_per_s"],
        # Two binomial rates on n images each: the standard error of their difference.
        "success_rate_difference": (early16["successes"] - early32["successes"]) / n,
        "success_rate_difference_stderr": float(np.sqrt(2 * p * (1 - p) / n)),
    }


def memory_section(setting: Setting) -> dict:
    """Device memory per in-flight image."""
    counts = sorted({*setting.config.memory.slots, setting.slots})
    peak = costs.device_peak_bytes()
    return {"memory": costs.memory(setting.model, setting.throughput, counts, setting.chunk, peak)}


def scaling_section(setting: Setting) -> dict:
    """Throughput along slots, population and pixels, then image size and batch size."""
    config, sc, throughput = setting.config, setting.config.scaling, setting.throughput
    points = {}

    def point(slots, popsize, pixels):
        if (slots, popsize, pixels) not in points:  # the base setting recurs on every axis
            points[slots, popsize, pixels] = _scaling_point(setting, slots, popsize, pixels)
        return points[slots, popsize, pixels]

    base = dict(slots=setting.slots, popsize=throughput.popsize, pixels=throughput.num_pixels)
    axes = (("slots", sc.slots), ("popsize", sc.popsize), ("pixels", sc.pixels))
    scaling = {name: [point(**(base | {name: v})) for v in values] for name, values in axes}
    scaling["image_size"] = [_image_size_point(setting, spec) for spec in sc.image_models]
    if sc.forward_batches:
        scaling["forward_batches"] = measure.forward_sweep(
            setting.model, list(sc.forward_batches), sc.forward_rounds, config.seed
        )
    return {"scaling": scaling}


def _scaling_point(setting: Setting, slots: int, popsize: int, pixels: int) -> dict:
    """The engine against the forward ceiling at one (slots, popsize, pixels)."""
    sc = setting.config.scaling
    dconf = dataclasses.replace(
        setting.throughput, popsize=popsize, num_pixels=pixels, generations=sc.generations
    )
    # A full wave of slots on every device.
    images = setting.workload.take(slots * len(jax.local_devices()))
    row = measure.throughput_point(
        setting.model, dconf, slots, images, sc.repetitions, sc.forward_loop_calls
    )
    setting.log(
        f"scaling slots={slots} popsize={popsize} pixels={pixels}: "
        f"engine {row['engine_qps']['median']:.1f} q/s, "
        f"efficiency {row['efficiency']['median']:.3f}"
    )
    return {"slots": slots, "popsize": popsize, "pixels": pixels, "batch": slots * popsize, **row}


def _image_size_point(setting: Setting, spec: str) -> dict:
    """The engine against the forward ceiling on another model (another image size)."""
    config, sc = setting.config, setting.config.scaling
    other = load_model(spec).with_precision(config.precision)
    dconf = dataclasses.replace(
        setting.throughput, popsize=sc.image_popsize, generations=sc.image_generations
    )
    count = sc.image_slots * len(jax.local_devices())  # a full wave of slots on every device
    images = measure.Workload(
        measure.random_images(count, other.image_shape, config.seed),
        np.zeros(count, np.int32),
        np.arange(count),
        "random",
    )
    row = measure.throughput_point(
        other, dconf, sc.image_slots, images, sc.repetitions, sc.forward_loop_calls
    )
    setting.log(f"scaling {spec}: engine {row['engine_qps']['median']:.1f} q/s")
    return {
        "model": spec,
        "image_shape": list(other.image_shape),
        "trained": other.meta.get("trained", True),
        "slots": sc.image_slots,
        "popsize": sc.image_popsize,
        **row,
    }


def devices_section(setting: Setting) -> dict:
    """The engine on 1, 2, ... forced host devices, one process each."""
    config, sc = setting.config, setting.config.scaling
    rows = children.device_scaling(
        config.model, config, sc.devices, sc.device_slots, sc.generations, sc.repetitions
    )
    return {"scaling": {"devices": rows}}


def xla_flags_section(setting: Setting) -> dict:
    """Forward and engine under each XLA_FLAGS setting, one process each."""
    config, xf = setting.config, setting.config.xla_flags
    setting.log("XLA flags: forward and engine under each flag set, one process each")
    rows = children.xla_flag_comparison(
        config.model,
        config,
        list(xf.flag_sets),
        xf.slots or setting.slots,
        xf.generations,
        xf.rounds,
        xf.forward_loop_calls,
    )
    return {"xla_flags": rows}


def incremental_section(setting: Setting) -> dict:
    """The incremental evaluator against the full one and the forward pass, per model
    and pixel count (`measure.evaluator_point`): queries/s at the same batch and
    device count, XLA's FLOPs and bytes per query, the activation cache per image."""
    ic = setting.config.incremental
    popsize = ic.popsize or setting.throughput.popsize
    rows = []
    for spec in ic.models:
        model = load_model(spec).with_precision(setting.config.precision)
        pixels = sorted({*ic.pixels, *(ic.more_pixels if spec in ic.more_pixels_models else ())})
        for num_pixels in pixels:
            row = measure.evaluator_point(
                model, num_pixels, popsize, ic.repetitions, ic.loop_calls, setting.config.seed
            )
            row["spec"] = spec
            _log_evaluator_point(setting.log, spec, num_pixels, row)
            rows.append(row)
    return {"incremental": rows}


def _log_evaluator_point(log, spec: str, num_pixels: int, row: dict) -> None:
    def median(name):
        return row[name]["median"]

    log(
        f"incremental {spec} k={num_pixels}: full {median('full_qps'):.1f}"
        f" q/s, incremental {median('incremental_qps'):.1f} q/s, "
        f"speed-up {median('speedup'):.2f}; without delta convolutions "
        f"{median('windows_qps'):.1f} q/s"
    )
    if "valid_taps_speedup_full" in row:
        log(
            f"incremental {spec} k={num_pixels}: valid taps' speed-up, full "
            f"{median('valid_taps_speedup_full'):.2f}, incremental "
            f"{median('valid_taps_speedup_incremental'):.2f}"
        )


def search_section(setting: Setting) -> dict:
    """The exhaustive one-pixel search against the configured DE (with its stop rule),
    on the same images in one process, interleaved: images/s, queries and successes,
    and whether the search fools every image DE fools."""
    config, section = setting.config, setting.config.search
    reference = plan.de_config(config, generations=section.de_generations)
    grid = exhaustive.ExhaustiveConfig(
        image_shape=tuple(setting.model.image_shape[:2]),
        colours=section.colours,
        stop="first",
        popsize=section.popsize,
    )
    images = setting.workload.take(section.num_images)
    chunk = measure.whole_chunk(len(images.images), len(jax.local_devices()))
    rules = {"de": reference, "exhaustive": grid}
    runs = {name: [] for name in rules}
    for rule in rules.values():  # compile, on one image with the same chunk
        measure.run_engine(
            setting.model,
            rule,
            setting.slots,
            images.take(1),
            config.seed,
            chunk=chunk,
            evaluator=setting.evaluator,
        )
    for _ in range(section.repetitions):
        for name, rule in rules.items():
            run = measure.run_engine(
                setting.model, rule, setting.slots, images, config.seed, evaluator=setting.evaluator
            )
            setting.log(
                f"search: {name}, {run['images']} images in {run['seconds']:.1f} s, "
                f"{run['successes']} fooled, {run['mean_queries']:.0f} queries an image"
            )
            runs[name].append(run)
    fooled = {name: np.asarray(r[0]["success_by_work_id"], bool) for name, r in runs.items()}
    ratio = [
        e["images_per_s"] / d["images_per_s"]
        for d, e in zip(runs["de"], runs["exhaustive"], strict=True)
    ]
    return {
        "search": {
            "images": len(images.images),
            "de": {
                "stop": reference.stop,
                "popsize": reference.popsize,
                "generations": reference.generations,
            },
            "exhaustive": {"colours": grid.colours, "grid_size": grid.grid_size},
            "evaluator": getattr(setting.evaluator, "name", str(setting.evaluator)),
            **{
                name: {
                    "images_per_s": measure.spread([r["images_per_s"] for r in rs]),
                    "queries_per_s": measure.spread([r["queries_per_s"] for r in rs]),
                    "mean_queries": rs[0]["mean_queries"],
                    "successes": rs[0]["successes"],
                }
                for name, rs in (("de_run", runs["de"]), ("exhaustive_run", runs["exhaustive"]))
            },
            "images_per_s_ratio": measure.spread(ratio),
            "exhaustive_fools_every_de_success": bool(np.all(fooled["exhaustive"] >= fooled["de"])),
        }
    }


@dataclasses.dataclass(frozen=True)
class Section:
    name: str  # its entry in the report's section_seconds, and its name in `needs`
    enabled: Callable[[ml_collections.ConfigDict], bool]
    # (setting, **runs of the sections in `needs`) -> report fields (a dict field is
    # merged into one of the same name), or (report fields, runs) when `gives`.
    measure: Callable[..., dict | tuple[dict, object]]
    # Earlier sections whose runs it reads, passed by name (None when one is disabled).
    needs: tuple[str, ...] = ()
    gives: bool = False  # it returns runs for later sections too


def _on(config, name: str) -> bool:
    section = config.get(name)
    return section is not None and bool(section.enabled)


def bf16_enabled(config) -> bool:
    """bfloat16 is compared with float32, so only from a float32 config."""
    return _on(config, "bf16") and config.precision == "float32"


def _devices_enabled(config) -> bool:
    return _on(config, "scaling") and bool(config.scaling.devices)


SECTIONS = (
    Section("main", lambda config: True, main_section, gives=True),
    Section("breakdown", lambda config: bool(config.breakdown), breakdown_section, ("main",)),
    Section("profile", lambda config: _on(config, "profile"), profile_section),
    Section("early_stop", lambda c: _on(c, "early_stop"), early_stop_section, gives=True),
    Section("bf16", bf16_enabled, bf16_section, ("main", "early_stop")),
    Section("memory", lambda config: _on(config, "memory"), memory_section),
    Section("scaling", lambda config: _on(config, "scaling"), scaling_section),
    Section("devices", _devices_enabled, devices_section),
    Section("xla_flags", lambda config: _on(config, "xla_flags"), xla_flags_section),
    Section("incremental", lambda config: _on(config, "incremental"), incremental_section),
    Section("search", lambda config: _on(config, "search"), search_section),
)


def prepare(
    config: ml_collections.ConfigDict, workdir: str, model: LoadedModel | None = None, log=print
) -> Setting:
    """The model, DE settings, slots and images that every section reads."""
    model = (model or load_model(config.model)).with_precision(config.precision)
    throughput = plan.de_config(config, stop="none")
    evaluator = incremental.make_evaluator(
        config.get("evaluator", "full"), model, throughput.num_pixels
    )
    slots = config.slots or devices.auto_slots(model, throughput.popsize, evaluator)
    log(
        f"model {model.name}, {slots} slots x popsize {throughput.popsize}, "
        f"{evaluator.name} evaluator"
    )
    workload = measure.load_workload(
        model, config, max(config.num_images, config.early_stop.num_images)
    )
    main = workload.take(config.num_images)
    return Setting(
        config=config,
        workdir=workdir,
        model=model,
        throughput=throughput,
        slots=slots,
        workload=workload,
        main=main,
        chunk=measure.whole_chunk(len(main.images), len(jax.local_devices())),
        log=log,
        evaluator=evaluator,
        model16=model.with_precision("bfloat16") if bf16_enabled(config) else None,
    )


def benchmark(
    config: ml_collections.ConfigDict,
    workdir: str,
    out: str = "",
    model: LoadedModel | None = None,
    log=print,
) -> dict:
    """Runs every enabled section; writes JSON and appends a Markdown report.

    `model` replaces `config.model` (tests pass an in-memory model). Returns the report.
    """
    started = time.perf_counter()
    setting = prepare(config, workdir, model, log)
    model, throughput = setting.model, setting.throughput
    report = {
        "machine": provenance.machine(),
        "model": {
            "name": model.name,
            "image_shape": list(model.image_shape),
            "num_classes": model.num_classes,
            "trained": model.meta.get("trained", True),
            "parameters": int(sum(np.size(x) for x in jax.tree.leaves(model.params))),
        },
        "config": json.loads(config.to_json()),
        "de": dataclasses.asdict(throughput),
        "slots": setting.slots,
        "batch": setting.slots * throughput.popsize,
        "images": setting.workload.source,
    }
    section_seconds = {}
    given = {}  # section name -> the runs it gives the sections after it
    for section in SECTIONS:
        if not section.enabled(config):
            continue
        fields = section.measure(setting, **{name: given.get(name) for name in section.needs})
        if section.gives:
            fields, given[section.name] = fields
        for field, value in fields.items():
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
