"""Whole runs through scripts/attack.py: configs, resume after kill -9, refusals, bad inputs.

Everything runs on a tiny synthetic setup written into tmp_path: a Keras-format
conv net on 8x8 images and a folder dataset labelled by that net, so no shared
data is needed. The subprocesses share a persistent compilation cache, so the
attack loop compiles once for the whole file.
"""

import importlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import xla_flags
from replay import expected_success, fgsm_reference, model_probs

from opa_jax import attack, data, de, devices, plan, run
from opa_jax import workdir as workdir_lib
from opa_jax.errors import InputError
from opa_jax.models import load_model

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for `configs`, as scripts/attack.py does

from configs import common, default  # noqa: E402

SIZE = 8  # image side of the tiny setup
NUM_IMAGES = 16


# ---------------------------------------------------------------------------
# The tiny setup (also used by test_sharding.py and test_report.py).


def write_tiny_keras(path, size=SIZE, num_classes=10, seed=0):
    """A Keras 2.1 Sequential file: Conv2D(16, 3x3, relu) - Flatten - Dense(softmax)."""
    rng = np.random.default_rng(seed)

    def layer(kind, name, **config):
        return {"class_name": kind, "config": {"name": name, "trainable": True, **config}}

    layers = [
        layer("Conv2D", "conv", filters=16, kernel_size=[3, 3], strides=[1, 1], padding="same",
              activation="relu", batch_input_shape=[None, size, size, 3]),
        layer("Flatten", "flatten"),
        layer("Dense", "dense", units=num_classes, activation="softmax"),
    ]  # fmt: skip
    weights = {
        "conv": {"kernel": rng.normal(0, 0.3, (3, 3, 3, 16)), "bias": np.zeros(16)},
        "dense": {
            "kernel": rng.normal(0, 0.1, (size * size * 16, num_classes)),
            "bias": np.zeros(num_classes),
        },
    }
    with h5py.File(path, "w") as h5:
        h5.attrs["keras_version"] = "2.1.4"
        h5.attrs["backend"] = "tensorflow"
        h5.attrs["model_config"] = json.dumps({"class_name": "Sequential", "config": layers})
        root = h5.create_group("model_weights")
        root.attrs["layer_names"] = np.array([name.encode() for name in weights])
        for name, arrays in weights.items():
            group = root.create_group(name)
            names = [f"{name}/{basename}:0" for basename in arrays]
            group.attrs["weight_names"] = np.array([n.encode() for n in names])
            for n, array in zip(names, arrays.values(), strict=True):
                group.create_dataset(n, data=array.astype(np.float32))
    return path


def write_images(root, images, labels, num_classes=10, split="test"):
    """`root/<split>/class<label>/<index>.png`; every class folder exists, even if empty."""
    from PIL import Image

    for label in range(num_classes):
        (root / split / f"class{label}").mkdir(parents=True, exist_ok=True)
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image).save(root / split / f"class{label}" / f"{index:05d}.png")
    return root


def write_tiny_setup(root, num_images=NUM_IMAGES, seed=0):
    """The tiny model and a dataset of random images labelled by its predictions."""
    root.mkdir(parents=True, exist_ok=True)
    model_path = write_tiny_keras(root / "tiny.h5")
    model = load_model(f"keras:{model_path}")
    images = np.random.default_rng(seed).integers(0, 256, (num_images, SIZE, SIZE, 3), np.uint8)
    labels = attack.predict_probs(model, images).argmax(-1)
    write_images(root / "data", images, labels)
    return {"model": f"keras:{model_path}", "data": f"folder:{root / 'data'}", "root": root}


def tiny_config(setup, **fields):
    """configs/default.py on the tiny setup, with small DE settings."""
    config = default.get_config()
    config.model, config.data = setup["model"], setup["data"]
    config.de.popsize, config.de.generations = 16, 50
    config.slots = 2
    for name, value in fields.items():
        target = config
        *parents, leaf = name.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


def tiny_flags(setup, **fields) -> list[str]:
    """The same settings as command-line flags for scripts/attack.py."""
    flags = {
        "model": setup["model"], "data": setup["data"], "de.popsize": 16,
        "de.generations": 50, "slots": 2, **fields,
    }  # fmt: skip
    return [f"--config={REPO / 'configs' / 'default.py'}"] + [
        f"--config.{name}={value}" for name, value in flags.items()
    ]


def script_env(cache_dir, devices=1) -> dict:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    env["XLA_FLAGS"] = xla_flags(f"--xla_force_host_platform_device_count={devices}")
    return env


def attack_command(flags, workdir=None, dry_run=False) -> list[str]:
    command = [sys.executable, str(REPO / "scripts" / "attack.py"), *flags]
    if workdir is not None:
        command.append(f"--workdir={workdir}")
    if dry_run:
        command.append("--dry_run")
    return command


def run_script(command, env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def by_item(records) -> dict:
    return {(r["image"], r["target_label"]): r for r in records}


def assert_same_records(got: list[dict], want: list[dict]):
    """Same items with the same outcomes; probabilities to float tolerance."""
    got, want = by_item(got), by_item(want)
    assert got.keys() == want.keys()
    for key, expected in want.items():
        record = got[key]
        for field in ("success", "adv_label", "perturbation", "generations", "queries",
                      "true_label", "target_label"):  # fmt: skip
            assert record[field] == expected[field], (key, field)
        np.testing.assert_allclose(record["adv_probs"], expected["adv_probs"], atol=1e-6)


# ---------------------------------------------------------------------------
# Configs.


def load_config_file(spec: str):
    """`configs/<spec>` as --config=configs/<spec> gives it (config string after ':')."""
    file_name, *arg = spec.split(":", 1)
    module = importlib.import_module(f"configs.{file_name.removesuffix('.py')}")
    return module.get_config(*arg)


def every_config_spec() -> list[str]:
    """Every attack config: the grid of each parameterised file, and the others as they are.
    (Other configs, such as train_*.py, are left out: they configure other scripts.)"""
    specs = []
    for path in sorted((REPO / "configs").glob("*.py")):
        if path.name in ("__init__.py", "common.py"):
            continue
        if path.name in PARAMETERISED:
            specs += [f"{path.name}:{arg}" for arg in PARAMETERISED[path.name]]
            continue
        config = load_config_file(path.name)  # takes no config string
        if "method" in config and "de" in config:  # an attack config
            specs.append(path.name)
    return specs


PARAMETERISED = {
    "cifar10.py": common.every_arg(),
    "cifar10_scipy.py": common.every_arg(),
    "cifar10_random_search.py": common.every_arg(),
    "cifar10_fgsm.py": common.every_arg(with_pixels=False),
}


def flat_keys(config, prefix=""):
    keys = set()
    for name, value in config.items():
        if hasattr(value, "items"):
            keys |= flat_keys(value, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


def test_every_config_loads_and_resolves():
    specs = every_config_spec()
    files = {s.split(":")[0] for s in specs}
    assert {"default.py", "lenet.py", "alexnet_imagenet_1px.py", *PARAMETERISED} <= files
    grid = 3 * 6 + 2  # per model: 3 files x 3 pixel counts x 2 modes, and FGSM's 2 modes
    assert len(specs) == grid * len(common.CIFAR10_MODELS) + len(files) - len(PARAMETERISED)
    default_keys = flat_keys(default.get_config())
    methods = {}
    for spec in specs:
        config = load_config_file(spec)
        assert flat_keys(config) == default_keys, spec  # overrides only, no new fields
        if config.method == "de":
            dconf = plan.de_config(config)
            assert isinstance(dconf, de.DEConfig) and dconf.num_pixels == config.pixels
        methods[spec] = (config.method, config.de.preset)
    nin = load_config_file("cifar10.py:nin,3,targeted")
    assert (nin.model, nin.pixels, nin.targeted) == ("ckpt:checkpoints/cifar10/nin", 3, True)
    assert methods["cifar10_scipy.py:lenet,1,nontargeted"] == ("de", "scipy")
    assert methods["cifar10_random_search.py:resnet,5,targeted"] == ("de", "random")
    assert methods["cifar10_fgsm.py:vgg16,targeted"][0] == "fgsm"
    assert (
        plan.de_config(load_config_file("cifar10_scipy.py:lenet,1,nontargeted")).generations == 75
    )
    alexnet = load_config_file("alexnet_imagenet_1px.py")
    assert alexnet.resize == "center_crop" and alexnet.model.startswith("alexnet:")


@pytest.mark.parametrize("arg", ["", "nin", "nin,2,targeted", "nin,1,tragetted", "mlp,1,targeted"])
def test_bad_config_strings_are_explained(arg):
    with pytest.raises(ValueError, match="MODEL,PIXELS,MODE"):
        load_config_file(f"cifar10.py:{arg}" if arg else "cifar10.py")


# ---------------------------------------------------------------------------
# Whole runs through the script.


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    setup = write_tiny_setup(root)
    setup["cache"] = root / "jax_cache"
    setup["flags"] = tiny_flags(
        setup, targeted=True, flush_seconds=1, num_images=NUM_IMAGES
    )  # every image against all 9 other classes
    setup["items"] = NUM_IMAGES * 9
    return setup


@pytest.fixture(scope="module")
def reference(tiny):
    """An uninterrupted run (it also fills the compilation cache)."""
    workdir = tiny["root"] / "reference"
    done = run_script(attack_command(tiny["flags"], workdir), script_env(tiny["cache"]))
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


def test_resume_after_kill_equals_an_uninterrupted_run(tiny, reference, tmp_path):
    workdir = tmp_path / "killed"
    results_file = workdir / "results.jsonl"
    process = subprocess.Popen(
        attack_command(tiny["flags"], workdir), env=script_env(tiny["cache"]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    lines, deadline = 0, time.time() + 240
    while time.time() < deadline and process.poll() is None:
        lines = results_file.read_bytes().count(b"\n") if results_file.exists() else 0
        if 0 < lines < tiny["items"]:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = results_file.read_bytes().count(b"\n")
    assert 0 < killed_at < tiny["items"]
    with open(results_file, "ab") as f:  # a torn write: half a record, no newline
        f.write(b'{"image": 3, "target_label": 1, "succ')

    resumed = run_script(attack_command(tiny["flags"], workdir), script_env(tiny["cache"]))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{tiny['items']} work items ({killed_at} already done)" in resumed.stderr

    lines = results_file.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is valid JSON
    keys = [(r["image"], r["target_label"]) for r in records]
    assert len(keys) == len(set(keys)) == tiny["items"]  # each item exactly once
    want = [json.loads(line) for line in (reference / "results.jsonl").read_text().splitlines()]
    assert_same_records(records, want)
    assert 0 < sum(r["success"] for r in want) < len(want)  # a mixed, non-trivial outcome
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["attacks"] == tiny["items"]
    assert summary["successes"] == sum(r["success"] for r in want)


def test_finished_workdir_refuses_another_config(tiny, reference):
    before = (reference / "results.jsonl").read_bytes()
    flags = tiny["flags"] + ["--config.de.popsize=20"]
    refused = run_script(attack_command(flags, reference), script_env(tiny["cache"]))
    assert refused.returncode != 0
    assert "different config (fields differ: ['de'])" in refused.stderr
    assert str(reference) in refused.stderr
    assert (reference / "results.jsonl").read_bytes() == before
    # Execution-only fields (here the flush period) are not part of the identity: resumes.
    flags = tiny["flags"] + ["--config.flush_seconds=5"]
    same = run_script(attack_command(flags, reference), script_env(tiny["cache"]))
    assert same.returncode == 0, same.stderr[-3000:]
    assert f"({tiny['items']} already done)" in same.stderr
    assert (reference / "results.jsonl").read_bytes() == before


def test_a_run_extends_to_more_images_but_never_shrinks(tiny, reference, tmp_path):
    """num_images may grow on resume: the extended run equals one run of the full size."""
    workdir = tmp_path / "extended"
    env = script_env(tiny["cache"])
    small = [f for f in tiny["flags"] if not f.startswith("--config.num_images=")]
    first = run_script(attack_command(small + ["--config.num_images=4"], workdir), env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((workdir / "config.json").read_text())["num_images"] == 4
    extended = run_script(attack_command(tiny["flags"], workdir), env)
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert f"{tiny['items']} work items ({4 * 9} already done)" in extended.stderr
    records = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    want = [json.loads(line) for line in (reference / "results.jsonl").read_text().splitlines()]
    assert_same_records(records, want)
    assert json.loads((workdir / "summary.json").read_text())["attacks"] == tiny["items"]
    assert json.loads((workdir / "config.json").read_text())["num_images"] == NUM_IMAGES
    # Shrinking is refused, and the results are left as they were.
    before = (workdir / "results.jsonl").read_bytes()
    shrunk = run_script(attack_command(small + ["--config.num_images=4"], workdir), env)
    assert shrunk.returncode != 0
    assert "not shrunk to 4" in shrunk.stderr
    assert (workdir / "results.jsonl").read_bytes() == before


def test_kept_records_resume_a_run_on_a_fresh_machine(tiny, reference, tmp_path):
    """scripts/keep_runs.py: a run's records saved to a store (as committed) and restored
    into a fresh tree resume it, and the extended run equals an uninterrupted one."""
    machine_a, machine_b, store = tmp_path / "a", tmp_path / "b", tmp_path / "store"
    env = script_env(tiny["cache"])
    small = [f for f in tiny["flags"] if not f.startswith("--config.num_images=")]
    first = run_script(attack_command(small + ["--config.num_images=2"], machine_a / "run"), env)
    assert first.returncode == 0, first.stderr[-3000:]
    with open(machine_a / "run" / "results.jsonl", "ab") as f:  # a record being written
        f.write(b'{"image": 9, "target_label": 1, "succ')
    keep = [sys.executable, str(REPO / "scripts" / "keep_runs.py")]
    saved = subprocess.run(keep + ["save", str(store), str(machine_a / "run")],
                           capture_output=True, text=True)  # fmt: skip
    assert saved.returncode == 0, saved.stderr
    kept = (store / "run" / "results.jsonl").read_text()
    assert kept.endswith("\n") and len(kept.splitlines()) == 2 * 9  # whole lines only
    assert sorted(p.name for p in (store / "run").iterdir()) == [
        "config.json", "results.jsonl", "run_info.json", "summary.json"]  # fmt: skip

    restored = subprocess.run(keep + ["restore", str(store), str(machine_b / "run")],
                              capture_output=True, text=True)  # fmt: skip
    assert restored.returncode == 0 and "restored" in restored.stdout, restored.stderr
    extended = run_script(attack_command(tiny["flags"], machine_b / "run"), env)
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert f"{tiny['items']} work items ({2 * 9} already done)" in extended.stderr
    lines = (machine_b / "run" / "results.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    want = [json.loads(x) for x in (reference / "results.jsonl").read_text().splitlines()]
    assert_same_records(records, want)
    # A run that has results is never overwritten by a restore; a bad run is named.
    again = subprocess.run(keep + ["restore", str(store), str(machine_b / "run")],
                           capture_output=True, text=True)  # fmt: skip
    assert "left as it is" in again.stdout
    assert len((machine_b / "run" / "results.jsonl").read_text().splitlines()) == tiny["items"]
    bad = subprocess.run(keep + ["save", str(store), str(tmp_path / "missing")],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 1 and "missing" in bad.stderr and "results*.jsonl" in bad.stderr


def test_dry_run_prints_the_plan_and_writes_nothing(tiny, tmp_path):
    workdir = tmp_path / "never_written"
    dry = run_script(attack_command(tiny["flags"], workdir, dry_run=True),
                     script_env(tiny["cache"]))  # fmt: skip
    assert dry.returncode == 0, dry.stderr[-3000:]
    plan = json.loads(dry.stdout)
    assert plan["work_items"] == tiny["items"]
    assert plan["de"]["popsize"] == 16 and plan["de"]["generations"] == 50
    assert plan["model"]["image_shape"] == [SIZE, SIZE, 3]
    assert not workdir.exists()


def test_cpu_devices_split_the_host_and_auto_respects_xla_flags(tiny, tmp_path):
    """cpu_devices=N gives N CPU devices; 0 gives one per core (at most 8) unless
    XLA_FLAGS already forces a count; a negative count is refused."""
    without_flag = script_env(tiny["cache"])
    without_flag["XLA_FLAGS"] = xla_flags()  # no device count
    cores = min(len(os.sched_getaffinity(0)), devices.MAX_AUTO_CPU_DEVICES)
    cases = [
        (["--config.cpu_devices=3"], script_env(tiny["cache"], devices=1), 3),  # overrides
        ([], script_env(tiny["cache"], devices=5), 5),  # auto: the forced count stands
        ([], without_flag, cores),
    ]
    for extra, env, want in cases:
        dry = run_script(attack_command(tiny["flags"] + extra, dry_run=True), env)
        assert dry.returncode == 0, dry.stderr[-3000:]
        plan = json.loads(dry.stdout)
        assert len(plan["devices"]) == want, (extra, want)
        assert plan["work_items"] == tiny["items"]
    bad = run_script(attack_command(tiny["flags"] + ["--config.cpu_devices=-1"], tmp_path / "w"),
                     without_flag)  # fmt: skip
    assert bad.returncode == 2 and "cpu_devices=-1: expected >= 0" in bad.stderr
    assert not (tmp_path / "w").exists()


def test_auto_slots_on_a_cpu_give_a_batch_of_about_400_per_device(tiny, monkeypatch):
    model = load_model(tiny["model"])
    assert [devices.auto_slots(model, p) for p in (400, 1000, 200, 100, 16)] == [1, 1, 2, 4, 25]
    # Little host memory: the slots shrink to fit half of it (never below 1).
    per_slot = devices.slot_bytes(model, 16)
    monkeypatch.setattr(devices, "host_available_bytes", lambda: 2 * 3 * per_slot + 1)
    assert devices.auto_slots(model, 16) == 3 and devices.auto_slots(model, 400) == 1
    monkeypatch.setattr(devices, "host_available_bytes", lambda: 1)
    assert devices.auto_slots(model, 16) == 1


# ---------------------------------------------------------------------------
# Bad inputs: each is refused with a message that names it.


def test_input_errors_exit_non_zero_with_the_message(tiny, tmp_path):
    bad_model = run_script(
        attack_command(tiny_flags(tiny, model="tflite:model.tflite"), tmp_path / "w"),
        script_env(tiny["cache"]),
    )
    assert bad_model.returncode == 2
    assert "error: model spec 'tflite:model.tflite': unknown kind 'tflite'" in bad_model.stderr
    assert not (tmp_path / "w").exists()
    typo = run_script(
        attack_command(tiny_flags(tiny) + ["--config.de.popsze=3"], tmp_path / "w"),
        script_env(tiny["cache"]),
    )
    assert typo.returncode != 0
    assert "popsze" in typo.stderr and 'Did you mean "popsize"' in typo.stderr
    assert not (tmp_path / "w").exists()


def bad_input_cases(setup, tmp_path):
    """(name, config fields, workdir, the message's pattern) for each kind of bad input."""
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(pathlib.Path(setup["model"].split(":", 1)[1]).read_bytes()[:3000])
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an hdf5 file at all" * 10)
    empty = tmp_path / "empty"
    (empty / "test" / "class0").mkdir(parents=True)
    wrong_size = write_images(
        tmp_path / "wrong_size", np.zeros((3, SIZE + 1, SIZE + 1, 3), np.uint8), [0, 1, 2]
    )
    three_classes = write_images(
        tmp_path / "three", np.zeros((3, SIZE, SIZE, 3), np.uint8), [0, 1, 2], num_classes=3
    )
    not_a_dir = tmp_path / "a_file"
    not_a_dir.write_text("x")
    workdir = tmp_path / "w"
    return [
        ("unknown model kind", {"model": "tflite:m.tflite"}, workdir, "unknown kind 'tflite'"),
        (
            "missing .h5",
            {"model": f"keras:{tmp_path}/missing.h5"},
            workdir,
            "missing.h5.*not found",
        ),
        ("corrupt .h5", {"model": f"keras:{corrupt}"}, workdir, "corrupt.h5"),
        ("not HDF5", {"model": f"keras:{garbage}"}, workdir, "garbage.h5.*not an HDF5 file"),
        ("no images", {"data": f"folder:{empty}"}, workdir, "empty.*no images found"),
        ("missing folder", {"data": f"folder:{tmp_path}/nowhere"}, workdir, "nowhere.*not exist"),
        ("wrong image size", {"data": f"folder:{wrong_size}"}, workdir, r"00000.png is 9x9.*8x8"),
        ("unknown dataset kind", {"data": "http://x"}, workdir, "dataset spec 'http://x'"),
        ("class count", {"data": f"folder:{three_classes}"}, workdir, "3 classes.*10 outputs"),
        ("unwritable workdir", {}, not_a_dir / "sub", "a_file/sub.*not writable"),
        ("bad preset", {"de.preset": "sciypy"}, workdir, "de.preset='sciypy'"),
        ("bad method", {"method": "cw"}, workdir, "method='cw'"),
        ("bad targets", {"targeted": True, "targets": "1,12"}, workdir, r"classes \[12\]"),
        ("bad selection", {"selection": "5,999"}, workdir, r"indices \[999\]"),
    ]


def test_bad_inputs_are_named(tiny, tmp_path):
    for name, fields, workdir, pattern in bad_input_cases(tiny, tmp_path):
        config = tiny_config(tiny, **fields)
        with pytest.raises(InputError, match=pattern):
            run.run_attack(config, str(workdir))
        assert not (tmp_path / "w").exists(), name  # nothing written before the check failed


def test_fgsm_run_records_the_dense_perturbation(tiny, tmp_path):
    """Every record against the FGSM step recomputed apart from opa_jax.baselines
    (tests/replay.py): the probabilities, pixels changed, L-inf and success."""
    config = tiny_config(tiny, method="fgsm", **{"fgsm.epsilon": 6.0})
    summary = run.run_attack(config, str(tmp_path / "fgsm"))
    records = workdir_lib.read_all_results(str(tmp_path / "fgsm"))
    assert len(records) == summary["attacks"] == NUM_IMAGES
    model = load_model(tiny["model"])
    dataset = data.load_dataset(tiny["data"], "test", model.image_shape)
    for record in records:
        assert record["method"] == "fgsm" and record["perturbation"] == []
        assert record["queries"] == 1
        position = int(np.flatnonzero(dataset.indices == record["image"])[0])
        clean = dataset.read([position])[0]
        adversarial = fgsm_reference(model, clean, record["true_label"], False, 6.0)
        probs = model_probs(model, adversarial[None])[0]
        np.testing.assert_allclose(probs, record["adv_probs"], atol=2e-6)
        np.testing.assert_allclose(model_probs(model, clean[None])[0], record["clean_probs"],
                                   atol=2e-6)  # fmt: skip
        changed = np.abs(adversarial - clean).max(-1)  # [H, W]
        assert record["l0_pixels"] == int(np.sum(changed > 0)) > 0
        assert record["linf"] == float(changed.max()) == 6.0
        assert record["success"] == expected_success(probs, record["true_label"], None)
        assert record["adv_label"] == int(np.argmax(probs))
    assert 0 < sum(r["success"] for r in records) < len(records)
