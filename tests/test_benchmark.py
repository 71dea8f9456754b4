"""The throughput benchmark on a toy model: a tiny full run and its invariants."""

import gzip
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import xla_flags

from configs import benchmark as benchmark_config
from opa_jax import attack, de, plan, profiling
from opa_jax.bench import benchmark, children, markdown, measure, sections
from opa_jax.models import LoadedModel, layers, load_model, zoo
from opa_jax.models.base import init_variables, make_apply_fn

POPSIZE, GENERATIONS, SLOTS, IMAGES = 10, 2, 2, 2  # one wave: scaling reuses the loop


def toy_logits(params, images):
    """Class 1 iff pixel (5, 7) has red > 200, else class 0."""
    del params
    red = images[:, 5, 7, 0]
    return jnp.stack([jnp.zeros_like(red), 0.2 * (red - 200.0)], axis=-1)


def tiny_config():
    config = benchmark_config.get_config()
    config.data = ""  # random images, labelled by the model
    config.de.popsize = POPSIZE  # SciPy's population: 2 per gene x 5 genes = 10 as well
    config.de.generations = GENERATIONS
    config.slots = SLOTS
    config.num_images = IMAGES
    config.repetitions = 1
    config.forward_loop_calls = 2
    config.early_stop.num_images = 2
    config.memory.slots = ()  # only at `slots`
    config.scaling.slots = (SLOTS,)
    config.scaling.popsize = (POPSIZE,)
    config.scaling.pixels = (1,)
    config.scaling.generations = GENERATIONS  # the main run's loop: compiled once
    config.scaling.image_models = ()
    config.scaling.devices = ()
    config.profile.enabled = True
    return config


def test_tiny_benchmark_reports_consistent_figures(tmp_path):
    model = LoadedModel("toy", toy_logits, {}, (8, 8, 3), 2)
    report = benchmark(tiny_config(), str(tmp_path), model=model, log=lambda _: None)

    saved = json.loads((tmp_path / "benchmark.json").read_text())
    for field in (
        "machine",
        "forward_ceiling",
        "engine",
        "efficiency",
        "scipy_baseline",
        "breakdown",
        "early_stop",
        "bf16",
        "memory",
        "scaling",
    ):
        assert field in saved, field
    assert saved["machine"]["backend"] == "cpu" and saved["machine"]["cpu_cores"] >= 1

    for name in ("efficiency", "efficiency_in_loop"):
        efficiency = report[name]["median"]
        assert math.isfinite(efficiency) and efficiency > 0, name
    assert report["forward_ceiling"]["batch"] == SLOTS * POPSIZE
    assert report["forward_ceiling"]["queries_per_call"] == SLOTS * POPSIZE  # one device

    # Early stop off, whole waves of slots: every image costs init + generations, no idle slot.
    run = report["engine"]["runs"][0]
    assert run["images"] == IMAGES
    assert run["evaluations"] == run["active_evaluations"] == IMAGES * POPSIZE * (GENERATIONS + 1)
    assert report["breakdown"]["idle_slots"] == 0.0
    # The baseline attacks at equal settings: the same queries per image.
    baseline = report["scipy_baseline"]
    assert baseline["queries_per_image"] == baseline["engine_queries_per_image"]
    assert baseline["speedup_images_per_s"]["median"] > 0

    # The parts of the step are timed and are a fraction of the engine's wall time.
    for part in ("de_step", "perturb", "host"):
        assert 0 <= report["breakdown"][part] < 1, part
    assert report["memory"]["loop"][0]["per_slot_bytes"] > 0
    # The base setting recurs on every scaling axis and is measured once.
    assert report["scaling"]["slots"][0] is report["scaling"]["pixels"][0]
    assert report["scaling"]["slots"][0]["engine_qps"]["median"] > 0
    # The profile: the toy model's operations on the device, self times within the trace.
    profile = report["profile"]
    assert (tmp_path / "profile").is_dir() and profile["trace_file"].endswith(".json.gz")
    assert profile["timelines"] >= 1 and 0 < profile["device_seconds"]
    shares = [op["share"] for op in profile["ops"]]
    assert 0 < len(shares) <= report["config"]["profile"]["top"]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    # XLA's operations only: no host-side Python spans, no threads waiting for others.
    names = [op["name"] for op in profile["ops"]]
    assert not [n for n in names if n.startswith("$") or "wait" in n.lower()], names
    text = (tmp_path / "benchmark.md").read_text()
    assert "| efficiency = engine / one-call ceiling |" in text
    assert "| operation | self seconds | share | count |" in text


def test_spread_and_digest():
    s = measure.spread([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"]) == (2.0, 1.0, 3.0)
    results = attack.Results(
        work_ids=np.array([1, 0]),
        success=np.array([True, False]),
        perturbation=np.zeros((2, 1, 5)),
        adv_probs=np.zeros((2, 2)),
        generations=np.array([1, 2]),
        queries=np.array([20, 30]),
    )
    fields = (
        results.work_ids,
        results.success,
        results.perturbation,
        results.adv_probs,
        results.generations,
        results.queries,
    )
    reordered = attack.Results(*[np.asarray(x)[::-1] for x in fields])
    assert measure.digest(results) == measure.digest(reordered)


@pytest.fixture(scope="module")
def tiny_keras_spec(tmp_path_factory):
    from test_run import write_tiny_keras

    path = tmp_path_factory.mktemp("keras") / "tiny.h5"
    write_tiny_keras(path)
    return f"keras:{path}"


def test_device_scaling_gives_identical_results_on_one_and_two_devices(tiny_keras_spec):
    rows = children.device_scaling(
        tiny_keras_spec, tiny_config(), (1, 2), slots=1, generations=1, repetitions=1
    )
    assert [row.get("error") for row in rows] == [None, None]
    assert [row["devices"] for row in rows] == [1, 2]  # the forced host devices took effect
    assert rows[0]["digest"] == rows[1]["digest"]
    assert all(row["engine_qps"]["median"] > 0 for row in rows)


def test_xla_flag_comparison_runs_each_setting_in_its_own_process(tiny_keras_spec):
    config = tiny_config()
    flag_sets = ("", "--xla_cpu_use_xnnpack=true")
    rows = children.xla_flag_comparison(
        tiny_keras_spec, config, flag_sets, slots=1, generations=1, rounds=1, loop_calls=2
    )
    assert [row["flags"] for row in rows] == list(flag_sets)
    for row in rows:
        assert "error" not in row, row.get("error")
        assert row["batch"] == POPSIZE
        assert row["forward_qps"]["median"] > 0 and row["engine_qps"]["median"] > 0
    # Each child ran with the flags of its setting, added to this process's XLA_FLAGS.
    base = os.environ.get("XLA_FLAGS", "")
    assert rows[0]["xla_flags_seen"] == [base]
    assert rows[1]["xla_flags_seen"] == [f"{base} --xla_cpu_use_xnnpack=true".strip()]
    assert rows[1]["max_prob_diff"] < 1e-5  # another convolution library, the same model
    table = markdown.xla_flags_table(rows)
    assert table[2].startswith("| (default) | 10 |")
    assert table[3].startswith("| `--xla_cpu_use_xnnpack=true` | 10 |")


def test_bf16_section_on_a_model_with_float_weights(tiny_keras_spec, tmp_path):
    """The bf16 section compares a model's float32 and bfloat16 forward passes on the
    clean images. On a conv net with float weights, rounding the weights and inputs
    moves the probabilities (so bfloat16 really ran), and the argmax stays."""
    config = tiny_config()
    model = load_model(tiny_keras_spec)
    workload = measure.load_workload(model, config, 16)  # random images, labelled by the model
    setting = sections.Setting(
        config=config,
        workdir=str(tmp_path),
        model=model,
        throughput=plan.de_config(config, stop="none"),
        slots=SLOTS,
        workload=workload,
        main=workload,
        chunk=len(workload.images),
        log=lambda _: None,
        model16=model.with_precision("bfloat16"),
    )
    main = sections.MainRuns(
        engines=[], ceilings=[100.0], ceilings_in_loop=None, forward16_qps=[150.0]
    )
    section = sections.bf16_section(setting, main=main, early_stop=None)["bf16"]
    assert section["clean_images"] == 16
    assert section["clean_argmax_agreement"] == 1.0
    assert 1e-4 < section["clean_max_abs_prob_diff"] < 0.05, section["clean_max_abs_prob_diff"]
    assert section["forward_speedup"]["median"] == 1.5
    assert "successes_bf16" not in section  # no early-stop runs to compare with


def test_sections_read_only_the_runs_of_earlier_sections_that_give_them():
    """The table is the contract between sections: each need names an earlier section
    that gives its runs, and the parameters of its function are those needs."""
    import inspect

    earlier = set()
    for section in sections.SECTIONS:
        for name in section.needs:
            assert name in earlier, (section.name, name)
        parameters = list(inspect.signature(section.measure).parameters)
        assert parameters == ["setting", *section.needs], section.name
        if section.gives:
            earlier.add(section.name)
    assert {"main", "early_stop"} <= earlier


def brightest_red(images):
    return images[..., 0].max(axis=(1, 2))  # [N]: any pixel will do


def red_flips_logits(params, images):
    """Two classes: class 1 once some pixel's red exceeds 200."""
    del params
    red = brightest_red(images)
    return jnp.stack([jnp.zeros_like(red), 0.2 * (red - 200.0)], axis=-1)


def near_miss_logits(params, images):
    """Three classes: the two others rise together with the brightest red but never pass
    class 0. At red 255, p = (0.34, 0.33, 0.33): p(true) < 0.5 with the argmax unchanged."""
    del params
    other = -0.05 - 0.05 * (255.0 - brightest_red(images))
    return jnp.stack([jnp.zeros_like(other), other, other], axis=-1)


def test_scipy_baseline_counts_a_success_by_the_argmax():
    """SciPy's DE succeeds when the argmax moves off the true label, as in the engine;
    driving p(true) below 0.5 is not enough with three classes."""
    config = de.DEConfig.from_preset("scipy", popsize=20, generations=15)
    images = np.full((2, 8, 8, 3), 100, np.uint8)
    workload = measure.Workload(images, np.zeros(2, np.int32), np.arange(2), "grey")
    flips = LoadedModel("flips", red_flips_logits, {}, (8, 8, 3), 2)
    near_miss = LoadedModel("near_miss", near_miss_logits, {}, (8, 8, 3), 3)
    assert measure.run_scipy(flips, config, workload)["successes"] == 2
    assert measure.run_scipy(near_miss, config, workload)["successes"] == 0
    forward = attack.jitted_probs(near_miss.apply_fn)
    missed = measure.scipy_attack(forward, {}, images[0], 0, config, seed=0)
    assert missed["fun"] < 0.5 and not missed["success"]  # p(true) < 0.5, argmax unchanged


def test_benchmark_script_runs_forward_and_engine_on_every_cpu_device(tiny_keras_spec, tmp_path):
    """With cpu_devices=2 the ceiling, like the engine, runs on both devices, and
    the per-device figures (batch, loop memory) stay per device."""
    from test_run import REPO, run_script, script_env

    overrides = {
        "model": tiny_keras_spec,
        "data": "",
        "cpu_devices": 2,
        "slots": SLOTS,
        "num_images": 2 * SLOTS,
        "de.popsize": POPSIZE,
        "de.generations": GENERATIONS,
        "repetitions": 1,
        "forward_loop_calls": 2,
        "breakdown": False,
        "baseline.enabled": False,
        "early_stop.enabled": False,
        "bf16.enabled": False,
        "memory.slots": "(1,)",
        "scaling.slots": f"({SLOTS},)",
        "scaling.popsize": f"({POPSIZE},)",
        "scaling.pixels": "(1,)",
        "scaling.generations": GENERATIONS,
        "scaling.image_models": "()",
        "scaling.devices": "()",
    }
    command = [
        sys.executable,
        str(REPO / "scripts" / "benchmark.py"),
        f"--config={REPO / 'configs' / 'benchmark.py'}",
        f"--workdir={tmp_path}",
    ]
    command += [f"--config.{k}={v}" for k, v in overrides.items()]
    env = script_env(tmp_path / "cache")
    env["XLA_FLAGS"] = xla_flags()  # no device count: one device per core
    done = run_script(command, env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert len(report["machine"]["devices"]) == 2
    assert report["forward_ceiling"]["batch"] == SLOTS * POPSIZE  # per device
    assert report["forward_ceiling"]["queries_per_call"] == 2 * SLOTS * POPSIZE  # both devices
    run = report["engine"]["runs"][0]
    # Both devices filled: every image's queries are active, none idle.
    assert run["images"] == 2 * SLOTS
    assert (
        run["evaluations"] == run["active_evaluations"] == 2 * SLOTS * POPSIZE * (GENERATIONS + 1)
    )
    assert math.isfinite(report["efficiency"]["median"]) and report["efficiency"]["median"] > 0
    assert report["memory"]["loop"][0]["per_slot_bytes"] > 0
    point = report["scaling"]["slots"][0]
    assert point["engine_qps"]["median"] > 0 and point["efficiency"]["median"] > 0


def test_self_times_do_not_count_nested_operations_twice():
    spans = [  # a while loop [0, 100) us holding a convolution and a fusion; a copy after it
        {"ts": 0, "dur": 100, "name": "while"},
        {"ts": 10, "dur": 50, "name": "conv"},
        {"ts": 60, "dur": 30, "name": "fusion"},
        {"ts": 100, "dur": 5, "name": "copy"},
    ]
    got = profiling.self_times(spans)
    assert got == pytest.approx({"while": 20e-6, "conv": 50e-6, "fusion": 30e-6, "copy": 5e-6})


def test_op_table_reads_the_xla_ops_line_of_an_accelerator_trace(tmp_path):
    """A GPU-style trace: the module and the stream repeat the operations; only
    the `XLA Ops` line is counted, and host (python) events are ignored."""

    def meta(pid, tid, kind, name):
        return {"ph": "M", "pid": pid, "tid": tid, "name": kind, "args": {"name": name}}

    def span(tid, ts, dur, name, pid=1):
        return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name}

    events = [
        meta(1, 0, "process_name", "/device:GPU:0"),
        meta(2, 0, "process_name", "/host:CPU"),
        meta(1, 1, "thread_name", "XLA Modules"),
        meta(1, 2, "thread_name", "XLA Ops"),
        meta(1, 3, "thread_name", "Stream #7(Compute)"),
        meta(2, 9, "thread_name", "python"),
        span(1, 0, 100, "jit_run_queue(123)"),
        span(2, 0, 60, "convolution.4"),
        span(2, 60, 20, "fusion.2"),
        span(2, 80, 20, "fusion.7"),
        span(3, 0, 60, "sm90_xmma_fprop_kernel"),
        span(9, 0, 500, "run_engine", pid=2),
    ]
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    table = profiling.op_table(str(path))
    assert table["timelines"] == 1
    assert [(op["name"], op["count"]) for op in table["ops"]] == [("convolution", 1), ("fusion", 2)]
    assert table["device_seconds"] == pytest.approx(100e-6)
    assert [op["share"] for op in table["ops"]] == pytest.approx([0.6, 0.4])


def test_incremental_section_compares_the_evaluators_per_model_and_pixels(
    tiny_keras_spec, tmp_path
):
    config = tiny_config()
    config.evaluator = "incremental"  # the main section's engine
    for name in ("early_stop", "bf16", "memory", "scaling", "profile"):
        config[name].enabled = False
    config.breakdown = False
    config.baseline.enabled = False
    config.incremental.enabled = True
    config.incremental.models = (tiny_keras_spec,)
    config.incremental.more_pixels_models = (tiny_keras_spec,)
    config.incremental.more_pixels = (3,)
    config.incremental.popsize = 8
    config.incremental.repetitions = 1
    config.incremental.loop_calls = 1
    model = load_model(tiny_keras_spec)
    report = benchmark(config, str(tmp_path), model=model, log=lambda _: None)

    assert report["engine"]["evaluator"] == "incremental"
    assert report["engine"]["runs"][0]["images"] == IMAGES
    rows = report["incremental"]
    assert [row["num_pixels"] for row in rows] == [1, 3]
    for row in rows:
        assert row["popsize"] == 8 and row["devices"] >= 1
        for name in (
            "forward_qps",
            "full_qps",
            "incremental_qps",
            "speedup",
            "windows_qps",
            "speedup_over_windows",
        ):
            assert row[name]["median"] > 0, name
        # The tiny net is conv - flatten - dense: its conv runs on windows, the dense
        # layer's matmul in full, so a query costs less than the forward pass.
        assert (row["convolutions"], row["convolutions_windowed"]) == (2, 1)
        costs = row["costs_per_query"]
        assert 0 < costs["incremental"]["flops"] < costs["full"]["flops"]
        assert costs["full"]["bytes_accessed"] > 0
        assert row["cache_bytes_per_image"] > 0
    # More pixels reach more of the map: more FLOPs per query.
    assert (
        rows[1]["costs_per_query"]["incremental"]["flops"]
        > (rows[0]["costs_per_query"]["incremental"]["flops"])
    )
    text = (tmp_path / "benchmark.md").read_text()
    assert "| model | k | devices x batch | forward q/s, in loop | full q/s |" in text


def test_evaluator_point_times_the_valid_taps_route_against_the_previous_one():
    """A narrow VGG16 (its 4x4 and 2x2 maps take the valid-taps route): the point also
    times both evaluators without the route, and the report gives their speed-ups."""
    module = zoo.build("vgg16", width=0.03125)
    model = LoadedModel(
        name="tiny-vgg16",
        apply_fn=make_apply_fn(module),
        params=init_variables(module, jax.random.key(0), (32, 32, 3)),
        image_shape=(32, 32, 3),
        num_classes=10,
        class_names=tuple(str(i) for i in range(10)),
        meta={"trained": False},
    )
    without = layers.valid_taps_route(model.apply_fn, False)
    with_taps = layers.valid_taps_route(model.apply_fn, True)
    assert measure._traced(with_taps, model) != measure._traced(without, model)
    nin = zoo.random_model("nin")  # no map small enough: the same program either way
    assert measure._traced(layers.valid_taps_route(nin.apply_fn, True), nin) == measure._traced(
        layers.valid_taps_route(nin.apply_fn, False), nin
    )
    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(
        model.apply_fn(model.params, images), without(model.params, images), rtol=1e-4, atol=1e-4
    )

    row = measure.evaluator_point(model, 1, popsize=4, repetitions=1, loop_calls=1)
    for name in (
        "no_taps_full_qps",
        "no_taps_incremental_qps",
        "valid_taps_speedup_full",
        "valid_taps_speedup_incremental",
    ):
        assert row[name]["median"] > 0, name
    text = "\n".join(markdown.incremental_lines({"incremental": [row]}))
    assert "| tiny-vgg16 | 1 | " in text and "one product per valid tap" in text


def test_search_section_times_the_exhaustive_search_against_de(tiny_keras_spec, tmp_path):
    config = tiny_config()
    for name in ("early_stop", "bf16", "memory", "scaling", "profile"):
        config[name].enabled = False
    config.breakdown = False
    config.baseline.enabled = False
    config.search.enabled = True
    config.search.num_images = 3
    config.search.repetitions = 2
    config.search.popsize = 64
    config.search.de_generations = 3
    model = load_model(tiny_keras_spec)
    report = benchmark(config, str(tmp_path), model=model, log=lambda _: None)

    r = report["search"]
    assert r["images"] == 3 and r["de"]["generations"] == 3 and r["de"]["popsize"] == POPSIZE
    h, w = model.image_shape[:2]
    assert r["exhaustive"]["grid_size"] == h * w * 8
    assert len(r["images_per_s_ratio"]["values"]) == 2
    assert 0 < r["exhaustive_run"]["mean_queries"] <= h * w * 8
    assert r["de_run"]["mean_queries"] <= POPSIZE * 4
    grid_fooled, de_fooled = r["exhaustive_run"]["successes"], r["de_run"]["successes"]
    assert isinstance(r["exhaustive_fools_every_de_success"], bool)
    if r["exhaustive_fools_every_de_success"]:
        assert grid_fooled >= de_fooled
    text = open(tmp_path / "benchmark.md").read()
    assert (
        "**Exhaustive search against DE**" in text and "Exhaustive / DE images per second" in text
    )
