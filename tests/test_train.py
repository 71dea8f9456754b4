"""Training: learning on a trivially learnable set, exact resumption, clear errors."""

import importlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import optax
import pytest
from conftest import xla_flags
from flax import serialization
from PIL import Image

from opa_jax import train, train_data
from opa_jax.errors import InputError
from opa_jax.models import base, checkpoint, load_model, model_card, zoo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # for `configs`, as scripts/train.py does

from configs import train_default  # noqa: E402


def write_images(root, split, count, rng, start):
    """Two classes told apart by brightness: dark pixels 0-100, bright 155-255."""
    for i in range(count):
        name = ("dark", "bright")[i % 2]
        low = 0 if name == "dark" else 155
        pixels = rng.integers(low, low + 101, (32, 32, 3), dtype=np.uint8)
        os.makedirs(os.path.join(root, split, name), exist_ok=True)
        # `<split>/<class>/<index>.png`, indices unique across classes.
        Image.fromarray(pixels).save(os.path.join(root, split, name, f"{start + i}.png"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("brightness"))
    rng = np.random.default_rng(0)
    write_images(root, "train", 64, rng, 0)
    write_images(root, "test", 32, rng, 1000)
    return root


def tiny_config(data_dir, **overrides):
    config = train_default.get_config()
    config.model = "nin"
    config.model_overrides.width = 0.125
    config.dataset = f"folder:{data_dir}"
    config.exact_test_data = ""
    config.batch_size = 16
    config.eval_batch_size = 32
    config.num_steps = 20  # 5 epochs of 4 steps
    config.optimizer = "adamw"
    config.learning_rate = 3e-3
    config.weight_decay = 1e-4
    config.warmup_epochs = 0.5
    config.log_every = 4
    config.checkpoint_every = 4
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    return workdir, train.train_and_evaluate(tiny_config(dataset), workdir)


def test_training_learns_and_writes_a_loadable_model(dataset, uninterrupted):
    workdir, result = uninterrupted
    assert not result["stopped"] and result["step"] == 20
    assert result["train_metrics"]["loss"] < 0.5  # from ln 2 = 0.69 at chance
    test = result["accuracies"]["test"]
    assert test["count"] == 32 and test["accuracy"] >= 0.9
    # The written model reproduces the recorded accuracy through the attack's interface.
    model = load_model(f"ckpt:{os.path.join(workdir, 'model')}")
    images, labels, class_names = train_data.load_split(f"folder:{dataset}", "test", (32, 32, 3))
    predictions = np.argmax(model.apply_fn(model.params, images.astype(np.float32)), -1)
    assert np.mean(predictions == labels) == test["accuracy"]
    assert model.class_names == class_names == ("bright", "dark")
    assert model.meta["accuracies"]["test"]["accuracy"] == test["accuracy"]
    assert model.meta["train_config"]["model_overrides"]["width"] == 0.125
    assert model.meta["seed"] == 0 and model.meta["model_config"]["num_classes"] == 2


def test_the_loop_runs_at_most_two_steps_ahead_of_the_device(dataset, tmp_path):
    """A SIGTERM or checkpoint waits for every step already dispatched, so the loop may
    not queue up to `log_every` of them (minutes of CPU steps on the zoo's networks)."""
    config = tiny_config(dataset, num_steps=12, log_every=12, checkpoint_every=12)
    training = train.setup(config, str(tmp_path))
    step_fn, outputs, unfinished = training.step_fn, [], []

    def watched_step_fn(*args):
        unfinished.append(sum(not leaf.is_ready() for leaf in outputs))
        state, metrics = step_fn(*args)
        outputs.append(metrics["loss_sum"])
        return state, metrics

    training.step_fn = watched_step_fn
    state, _, stopped, _ = train.train_loop(config, str(tmp_path), training)
    assert not stopped and int(state.step) == 12 and len(unfinished) == 12
    assert train.MAX_STEPS_IN_FLIGHT == 2 and max(unfinished) <= 1, unfinished


def test_resume_after_stop_equals_uninterrupted_run(dataset, uninterrupted, tmp_path):
    _, reference = uninterrupted
    workdir = str(tmp_path / "resumed")
    first = train.train_and_evaluate(tiny_config(dataset, stop_after_steps=10), workdir)
    assert first["stopped"] and first["step"] == 10
    assert not os.path.exists(os.path.join(workdir, "model"))
    # As written before CPU seconds were kept: the resumed run counts them from step 10.
    path = os.path.join(workdir, "checkpoints", train.TRAIN_STATE_FILE)
    with open(path, "rb") as f:
        payload = serialization.msgpack_restore(f.read())
    del payload["cpu_seconds"], payload["cpu_from_step"]
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize(payload))
    assert train.read_train_state(workdir, tiny_config(dataset))[2] is None
    # The killed run's state differs from the final one; resuming reaches it exactly.
    second = train.train_and_evaluate(tiny_config(dataset), workdir)
    assert second["step"] == 20 and not second["stopped"]
    leaves = jax.tree_util.tree_leaves_with_path(second["variables"])
    expected = dict(jax.tree_util.tree_leaves_with_path(reference["variables"]))
    halfway = dict(jax.tree_util.tree_leaves_with_path(first["variables"]))
    assert len(leaves) == len(expected)
    for path, value in leaves:
        np.testing.assert_allclose(value, expected[path], rtol=1e-6, atol=1e-6)
    assert any(not np.allclose(halfway[p], expected[p]) for p, _ in leaves)
    assert second["accuracies"] == reference["accuracies"]
    meta = checkpoint.read_model_json(os.path.join(workdir, "model"))
    assert meta["train_cpu_from_step"] == 10 and meta["train_cpu_s"] > 0
    assert "from step 10 on (not kept before)" in model_card.model_card(
        os.path.join(workdir, "model")
    )


def test_a_run_projected_past_max_hours_stops_at_its_first_log_line(dataset, tmp_path):
    """`max_hours`: a run projected past twice its limit stops with a checkpoint at its
    first log line (step 4 here), and resumes with another limit."""
    workdir = str(tmp_path / "run")
    first = train.train_and_evaluate(tiny_config(dataset, max_hours=1e-9), workdir)
    assert first["stopped"] and first["stop_reason"] == "max_hours" and first["step"] == 4
    assert train.read_train_state(workdir, tiny_config(dataset)) is not None
    assert not os.path.exists(os.path.join(workdir, "model"))
    second = train.train_and_evaluate(tiny_config(dataset, max_hours=1000.0), workdir)
    assert not second["stopped"] and second["step"] == 20


def test_progressive_resizing_trains_its_early_phases_on_smaller_images(dataset, tmp_path):
    """Resizing "16:0.25,24:0.5": steps 0-4 see 16x16 images, 5-9 24x24, 10-19 the native 32x32;
    the run learns, and a stop inside the resized phases resumes to the same weights."""
    config = tiny_config(dataset, progressive_resizing="16:0.25,24:0.5")
    workdir = str(tmp_path / "whole")
    training = train.setup(config, workdir)
    assert [(end, size) for end, size, _ in training.resized] == [(5, (16, 16)), (10, (24, 24))]
    assert training.cost(0, 20) == pytest.approx(5 * 0.25 + 5 * 0.5625 + 10)
    assert training.cost(7, 12) == pytest.approx(3 * 0.5625 + 2)
    seen = []

    def watched(fn, size):
        def step_fn(*args):
            seen.append(size)
            return fn(*args)

        return step_fn

    training.resized = tuple((end, size, watched(fn, size)) for end, size, fn in training.resized)
    training.step_fn = watched(training.step_fn, (32, 32))
    state, _, stopped, _ = train.train_loop(config, workdir, training)
    assert not stopped and int(state.step) == 20
    assert seen == [(16, 16)] * 5 + [(24, 24)] * 5 + [(32, 32)] * 10

    whole = train.train_and_evaluate(config, str(tmp_path / "again"))
    assert whole["accuracies"]["test"]["accuracy"] >= 0.9  # evaluated at the native size
    resumed = str(tmp_path / "resumed")
    first = train.train_and_evaluate(
        tiny_config(dataset, progressive_resizing="16:0.25,24:0.5", stop_after_steps=7), resumed
    )
    assert first["stopped"] and first["step"] == 7
    second = train.train_and_evaluate(config, resumed)
    for (path, value), (_, expected) in zip(
        jax.tree_util.tree_leaves_with_path(second["variables"]),
        jax.tree_util.tree_leaves_with_path(whole["variables"]),
        strict=True,
    ):
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-6, err_msg=str(path))
    card = model_card.model_card(os.path.join(resumed, "model"))
    assert "progressive resizing `16:0.25,24:0.5`" in card


def test_a_resized_train_step_feeds_the_model_antialiased_smaller_images():
    module = zoo.build("nin", width=0.125, num_classes=2)
    variables = base.init_variables(module, jax.random.key(0), (32, 32, 3))
    shapes = []

    def apply_fn(variables, images, **kwargs):
        shapes.append(images.shape)
        return module.apply(variables, images, **kwargs)

    state = train.TrainState.create(
        apply_fn=apply_fn, params=variables["params"], tx=optax.sgd(0.1), batch_stats={}
    )
    images = np.full((4, 32, 32, 3), 200, np.uint8)
    options = dict(seed=0, augment_padding=0, label_smoothing=0.0, num_classes=2)
    _, metrics = train.train_step(
        state, images, np.zeros(4, np.int32), train_size=(16, 12), **options
    )
    assert shapes == [(4, 16, 12, 3)] and int(metrics["count"]) == 4
    resized = jax.image.resize(images.astype(np.float32), (4, 16, 12, 3), "linear", antialias=True)
    np.testing.assert_allclose(resized, 200.0, atol=1e-3)  # a flat image stays flat


@pytest.mark.parametrize(
    "spec, model, message",
    [
        ("16", "nin", "expected SIZE:UNTIL"),
        ("16:0.5,24:0.4", "nin", "fractions of the steps increasing"),
        ("32:0.5", "nin", "below the native height 32"),
        ("16:1.0", "nin", "within \\(0, 1\\)"),
    ],
)
def test_bad_progressive_resizing_is_refused_before_any_step(
    dataset, tmp_path, spec, model, message
):
    config = tiny_config(dataset, progressive_resizing=spec, model=model)
    with pytest.raises(InputError, match=message):
        train.setup(config, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_a_model_whose_dense_layer_reads_a_flattened_map_cannot_be_resized(dataset):
    """AlexNet's fc6 reads its last pool's map flattened: 6x6x256 at 227x227, 2x2x256 at
    67x67, so the weights of one size do not fit the other."""
    config = tiny_config(dataset, progressive_resizing="67:0.5", model="alexnet")
    module = zoo.build("alexnet", num_classes=10)
    with pytest.raises(InputError, match="'alexnet' cannot train on 67x67 images"):
        train._check_resizable(module, (227, 227, 3), (67, 67), config)


def test_vgg16_trains_at_progressive_resizings_sizes_with_its_native_weights(dataset, tmp_path):
    """VGG16's five pools take 32 to 1; at 16 and 24 the map is one position before the
    last pool (or two), which passes it as it is, so fc1 reads 512 values at every size."""
    module = zoo.build("vgg16", width=0.125, num_classes=10)
    variables = base.init_variables(module, jax.random.key(0), (32, 32, 3))
    for size in (16, 24, 32):
        shapes = base.variable_shapes(module, (size, size, 3))
        assert jax.tree_util.tree_map(np.shape, shapes) == jax.tree_util.tree_map(
            np.shape, variables
        ), size
        logits = module.apply(variables, np.full((2, size, size, 3), 128.0, np.float32))
        assert logits.shape == (2, 10) and np.isfinite(logits).all()
    config = tiny_config(dataset, progressive_resizing="16:0.3,24:0.6", model="vgg16")
    training = train.setup(config, str(tmp_path / "w"))
    assert [(end, size) for end, size, _ in training.resized] == [(6, (16, 16)), (12, (24, 24))]


def test_max_hours_does_not_count_the_first_steps_compilation(dataset, tmp_path):
    """The first step compiles (here: a 3 s sleep); timed with it, 20 steps at 4 per 3 s
    would project past max_hours (7.2 s), and the run would stop at step 4."""
    config = tiny_config(dataset, max_hours=0.002)
    training = train.setup(config, str(tmp_path))
    step_fn, calls = training.step_fn, []

    def compiling_step_fn(*args):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(3.0)
        return step_fn(*args)

    training.step_fn = compiling_step_fn
    state, _, stopped, _ = train.train_loop(config, str(tmp_path), training)
    assert stopped == "" and int(state.step) == 20


def _slowed(training, seconds_at):
    """`training` with steps slowed: step n (1-based) sleeps `seconds_at(n)` seconds."""
    step_fn, calls = training.step_fn, []

    def slow_step_fn(*args):
        calls.append(1)
        time.sleep(seconds_at(len(calls)))
        return step_fn(*args)

    training.step_fn = slow_step_fn
    return training


def test_a_run_slowed_only_at_its_first_log_line_is_judged_again_and_goes_on(
    dataset, tmp_path, caplog
):
    """Steps 2-4 sleep 0.5 s (another job's burst), the rest take milliseconds: the first
    log line projects about 9.5 s (19 steps at its rate; 11-15 s if steps are slow), over
    max_hours (8 s) but under twice it, so the run is judged again at the next line,
    which projects about 2-4 s, and runs to the end."""
    config = tiny_config(dataset, max_hours=8 / 3600)
    training = _slowed(train.setup(config, str(tmp_path)), lambda n: 0.5 if 2 <= n <= 4 else 0)
    with caplog.at_level(logging.INFO):
        state, _, stopped, _ = train.train_loop(config, str(tmp_path), training)
    assert stopped == "" and int(state.step) == 20
    assert "judged again at the next log line (1 of 3)" in caplog.text


def test_a_run_over_max_hours_at_each_of_its_first_log_lines_stops_at_the_third(
    dataset, tmp_path, caplog
):
    """Every step sleeps 0.5 s: each log line (every 2 steps) projects the 7 steps after
    the first at that rate, about 3.5 s (up to 5.6 s if steps take 0.3 s more), over
    max_hours (3 s) but under twice it, so the run stops at the third line (step 6)."""
    config = tiny_config(dataset, max_hours=3 / 3600, log_every=2, num_steps=8)
    training = _slowed(train.setup(config, str(tmp_path)), lambda n: 0.5)
    with caplog.at_level(logging.INFO):
        state, _, stopped, _ = train.train_loop(config, str(tmp_path), training)
    assert stopped == "max_hours" and int(state.step) == 6
    assert "(2 of 3)" in caplog.text and "over max_hours=0.000833333: stopping" in caplog.text


def test_the_logged_rate_leaves_out_evaluations_and_the_eta_adds_those_due(
    dataset, tmp_path, monkeypatch, caplog
):
    """An evaluation every 4 steps that takes over 4 s: the step-8 log line's images/s is
    of the train steps alone, and its ETA counts the 2 evaluations still due (steps 8 and
    12). The bounds hold for train steps of up to 0.5 s (a loaded machine)."""
    config = tiny_config(
        dataset, num_steps=16, log_every=8, checkpoint_every=100, eval_every_epochs=1.0
    )
    evaluate = train.periodic_evaluation

    def slow_evaluation(*args):
        time.sleep(4.0)
        return evaluate(*args)

    monkeypatch.setattr(train, "periodic_evaluation", slow_evaluation)
    with caplog.at_level(logging.INFO):
        state, _, stopped, _ = train.train_loop(
            config, str(tmp_path), train.setup(config, str(tmp_path))
        )
    assert stopped == "" and int(state.step) == 16
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("step 8/16"))
    rate, eta = re.search(r"([0-9.]+) images/s, ETA ([0-9.]+)s", line).groups()
    # Counted with the 4 s evaluation, 7 steps of 16 images would log under 28 images/s.
    assert float(rate) > 28, line
    assert 8.0 <= float(eta) < 14.0, line


def test_resuming_with_another_config_is_refused(dataset, uninterrupted):
    workdir, _ = uninterrupted
    with pytest.raises(InputError, match=r"different run.*model_overrides"):
        train.train_and_evaluate(tiny_config(dataset, model_overrides={"width": 0.25}), workdir)


def test_corrupt_training_checkpoint_is_refused(dataset, tmp_path):
    path = tmp_path / "checkpoints" / train.TRAIN_STATE_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x85garbage")
    with pytest.raises(InputError, match="corrupt"):
        train.train_and_evaluate(tiny_config(dataset), str(tmp_path))


def test_bad_dataset_specs_and_options(dataset, tmp_path):
    cases = [
        ({"dataset": "cifar10"}, "expected folder:PATH or tfds:NAME"),
        ({"dataset": f"folder:{tmp_path}/nowhere"}, "does not exist"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"batch_size": 1000}, "fewer than one batch"),
    ]
    for overrides, message in cases:
        with pytest.raises(InputError, match=message):
            train.train_and_evaluate(tiny_config(dataset, **overrides), str(tmp_path / "w"))


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.model=resnet50", "unknown model architecture 'resnet50'; known: alexnet"),
        ("--config.dataset=cifar10", "expected folder:PATH or tfds:NAME"),
    ],
)
def test_script_exits_nonzero_with_the_message(tmp_path, flag, message):
    workdir = tmp_path / "run"
    completed = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "scripts", "train.py"),
            f"--config={os.path.join(REPO, 'configs', 'train_nin.py')}",
            f"--workdir={workdir}",
            "--config.exact_test_data=",
            flag,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert message in completed.stderr
    assert not workdir.exists() or not any(workdir.iterdir())  # nothing written


def test_schedules_warm_up_peak_and_decay():
    settings = train.OptimizerSettings(
        optimizer="sgd",
        learning_rate=0.1,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        schedule="warmup_cosine",
        warmup_epochs=2.0,
        one_cycle_pct_start=0.25,
    )
    schedule = train.make_schedule(settings, total_steps=100, steps_per_epoch=10)
    assert float(schedule(0)) == 0.0 and abs(float(schedule(20)) - 0.1) < 1e-7
    assert float(schedule(60)) < 0.1 and float(schedule(100)) < 1e-6
    cycle = train.make_schedule(
        train.OptimizerSettings(**{**settings.__dict__, "schedule": "one_cycle"}), 100, 10
    )
    assert max(range(100), key=lambda s: float(cycle(s))) == 25
    assert float(cycle(0)) < 0.01 and float(cycle(99)) < 1e-3


def test_weight_decay_spares_biases_and_batch_norm():
    settings = train.OptimizerSettings("sgd", 0.0, 0.0, False, 0.1, "constant", 0.0, 0.25)
    tx = train.make_optimizer(settings, optax.constant_schedule(1.0))
    params = {
        "conv": {"kernel": np.ones((3, 3, 2, 2)), "bias": np.ones(2)},
        "bn": {"scale": np.ones(2)},
    }
    grads = jax.tree_util.tree_map(np.zeros_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert np.allclose(updates["conv"]["kernel"], -0.1)
    assert np.allclose(updates["conv"]["bias"], 0) and np.allclose(updates["bn"]["scale"], 0)


def test_augmentation_is_a_padded_crop_maybe_flipped():
    image = np.random.default_rng(0).uniform(0, 255, (8, 8, 3)).astype(np.float32)
    padded = np.pad(image, ((2, 2), (2, 2), (0, 0)))
    seen = set()
    for i in range(20):
        out = np.asarray(train_data.augment_image(jax.random.key(i), image, 2))
        matches = [
            (top, left, flip)
            for top in range(5)
            for left in range(5)
            for flip in (False, True)
            if np.array_equal(out, padded[top : top + 8, left : left + 8][:, :: -1 if flip else 1])
        ]
        assert matches, i
        seen.add(matches[0])
    assert len(seen) > 5  # offsets and flips vary with the key


def test_model_checkpoint_records_software_and_dtype(uninterrupted):
    workdir, _ = uninterrupted
    description = checkpoint.read_model_json(os.path.join(workdir, "model"))
    assert description["weights_dtype"] == "float32"
    assert set(description["software"]) >= {"jax", "flax", "optax", "numpy"}


# Steps of the data-parallel comparison. Two: after that, rounding differences between
# the 1- and 2-device reductions can flip a near-tie (a ReLU at zero, the first maximum
# of a pooling window that takes the gradient), and the runs drift apart far beyond
# float rounding (seen on an AVX-512 machine from step 3 or 4: 0.4-1.6% of a BN bias).
PARALLEL_STEPS = 2


def train_script(workdir, data_dir, cpu_devices: int) -> subprocess.CompletedProcess:
    """scripts/train.py on a tiny NiN, its CPU split into `cpu_devices` XLA devices."""
    env = dict(os.environ, XLA_FLAGS=xla_flags())  # no device count: the config sets it
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "scripts", "train.py"),
            f"--config={os.path.join(REPO, 'configs', 'train_nin.py')}",
            f"--workdir={workdir}",
            f"--config.dataset=folder:{data_dir}",
            "--config.exact_test_data=",
            "--config.model_overrides.width=0.125",
            "--config.batch_size=16",
            "--config.eval_batch_size=32",
            f"--config.num_steps={PARALLEL_STEPS}",
            "--config.warmup_epochs=0.5",
            "--config.learning_rate=0.05",
            f"--config.cpu_devices={cpu_devices}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )


def test_data_parallel_steps_do_not_depend_on_the_device_count(dataset, tmp_path):
    """The same run on 1 CPU device and on 3 (a batch of 16 is sharded over 2 of them):
    batch sharded, gradients and batch-norm statistics summed across devices, so the
    weights agree up to float rounding."""
    assert jax.local_device_count() == 1  # this process: the 1-device run, in process
    config = importlib.import_module("configs.train_nin").get_config()
    config.update(
        dict(
            dataset=f"folder:{dataset}",
            exact_test_data="",
            batch_size=16,
            eval_batch_size=32,
            num_steps=PARALLEL_STEPS,
            warmup_epochs=0.5,
            learning_rate=0.05,
        )
    )
    config.model_overrides.width = 0.125
    train.train_and_evaluate(config, str(tmp_path / "devices1"))
    one = load_model(f"ckpt:{tmp_path / 'devices1' / 'model'}")
    completed = train_script(tmp_path / "devices3", dataset, 3)  # the script, 3 CPU devices
    assert completed.returncode == 0, completed.stderr[-3000:]
    sharded = load_model(f"ckpt:{tmp_path / 'devices3' / 'model'}")
    assert len(one.meta["devices"]) == 1 and len(sharded.meta["devices"]) == 2
    module = zoo.build("nin", width=0.125, num_classes=2)
    initial = dict(
        jax.tree_util.tree_leaves_with_path(
            base.init_variables(module, jax.random.key(0), (32, 32, 3))
        )
    )
    leaves = jax.tree_util.tree_leaves_with_path(sharded.params)
    expected = dict(jax.tree_util.tree_leaves_with_path(one.params))
    assert len(leaves) == len(expected) == len(initial)
    moved = []
    for path, value in leaves:
        scale = np.abs(expected[path]).max()
        np.testing.assert_allclose(
            value,
            expected[path],
            rtol=0,
            atol=1e-4 * scale + 1e-6,
            err_msg=jax.tree_util.keystr(path),
        )
        moved.append(np.abs(expected[path] - initial[path]).max() / (scale + 1e-6))
    assert max(moved) > 1e-2  # training moved the weights far beyond the tolerance
    assert one.meta["accuracies"] == sharded.meta["accuracies"]


@pytest.mark.parametrize("name", ["nin", "allconv", "vgg16"])
def test_cpu_recipes_are_short_one_cycle_runs_on_the_jpeg_set(name):
    module = importlib.import_module(f"configs.train_{name}")
    long, cpu = module.get_config(), module.get_config("cpu")
    assert cpu.model == long.model == name
    assert cpu.num_epochs <= 30 < long.num_epochs
    assert (cpu.schedule, cpu.label_smoothing, cpu.save_dtype) == ("one_cycle", 0.1, "float16")
    assert cpu.dataset == "folder:runs/data/cifar10-jpeg" and cpu.augment
    assert cpu.cpu_devices == 1  # no cross-device all-reduce to abort under load
    short = module.get_config("short")  # the same recipe, cut to about two hours
    assert short.num_epochs <= 10 < cpu.num_epochs  # 0.16-0.25 h an epoch here
    differing = {k for k in cpu.to_dict() if cpu.to_dict()[k] != short.to_dict()[k]}
    assert differing == {"num_epochs"}
    with pytest.raises(ValueError, match=f"train_{name}.py:gpu"):
        module.get_config("gpu")


def test_history_is_the_epochs_to_accuracy_curve_across_a_resume(dataset, uninterrupted, tmp_path):
    """Evaluations every epoch go to history.jsonl; one written after the last checkpoint
    of a killed run is dropped on resume and written again, so each epoch appears once."""
    _, reference = uninterrupted
    workdir = str(tmp_path / "history")
    config = tiny_config(dataset, eval_every_epochs=1.0, checkpoint_every=8, stop_after_steps=12)
    train.train_and_evaluate(config, workdir)  # checkpoints at steps 8 and 12
    with open(os.path.join(workdir, train.HISTORY_FILE), "a") as f:  # as if killed at step 17
        f.write(json.dumps({"step": 16, "epoch": 4.0, "train_seconds": 0.0}) + "\n")
    result = train.train_and_evaluate(
        tiny_config(dataset, eval_every_epochs=1.0, checkpoint_every=8), workdir
    )
    history = train.read_history(workdir)
    assert [r["step"] for r in history] == [4, 8, 12, 16]  # epochs 1-4; the end is the final eval
    assert [r["epoch"] for r in history] == [1.0, 2.0, 3.0, 4.0]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 and "train_loss" in r for r in history)
    seconds = [r["train_seconds"] for r in history]
    assert seconds == sorted(seconds) and seconds[-1] > 0
    assert result["accuracies"] == reference["accuracies"]  # evaluating changes nothing
    model = load_model(f"ckpt:{os.path.join(workdir, 'model')}")
    assert [r["step"] for r in model.meta["history"]] == [4, 8, 12, 16]


def test_float16_model_keeps_its_stored_accuracy_time_and_card(dataset, tmp_path, monkeypatch):
    """A float16 model records the accuracy of the weights as stored (what a load gives),
    the float32 one beside it, and the training seconds over a stop and resume; its
    model card shows them with the epochs-to-accuracy curve."""
    evaluated = []  # the variables of each final evaluation, in order
    final_evaluation = train.final_evaluation
    monkeypatch.setattr(
        train,
        "final_evaluation",
        lambda config, training, variables: (
            evaluated.append(variables) or final_evaluation(config, training, variables)
        ),
    )
    workdir = str(tmp_path / "half")
    config = tiny_config(dataset, save_dtype="float16", eval_every_epochs=1.0, stop_after_steps=8)
    train.train_and_evaluate(config, workdir)
    _, seconds_at_stop, (cpu_at_stop, cpu_from_step) = train.read_train_state(workdir, config)
    assert seconds_at_stop > 0 and cpu_at_stop > 0 and cpu_from_step == 0
    train.train_and_evaluate(
        tiny_config(dataset, save_dtype="float16", eval_every_epochs=1.0), workdir
    )
    model = load_model(f"ckpt:{os.path.join(workdir, 'model')}")
    images, labels, _ = train_data.load_split(f"folder:{dataset}", "test", (32, 32, 3))
    predictions = np.argmax(model.apply_fn(model.params, images.astype(np.float32)), -1)
    meta = model.meta
    assert meta["weights_dtype"] == "float16"
    assert meta["accuracies"]["test"]["accuracy"] == np.mean(predictions == labels)
    assert set(meta["accuracies_float32"]) == {"test"}
    # "accuracies" are of the weights as float16 stores them, "accuracies_float32" of the
    # weights before the cast: every float16 weight is one the float32 ones round to.
    as_stored, before_cast = (jax.tree_util.tree_leaves(v) for v in evaluated)
    rounded = [np.asarray(x).astype(np.float16).astype(np.float32) for x in before_cast]
    assert all(np.array_equal(a, r) for a, r in zip(as_stored, rounded, strict=True))
    assert not all(np.array_equal(b, r) for b, r in zip(before_cast, rounded, strict=True))
    loaded = jax.tree_util.tree_leaves(model.params)
    assert all(np.array_equal(a, np.asarray(x)) for a, x in zip(as_stored, loaded, strict=True))
    assert meta["train_time_s"] > seconds_at_stop and meta["epochs"] == 5.0
    assert meta["train_cpu_s"] > cpu_at_stop and meta["train_cpu_from_step"] == 0
    cpu = [r["train_cpu_seconds"] for r in meta["history"]]
    assert cpu == sorted(cpu) and 0 < cpu[0] and cpu[-1] < meta["train_cpu_s"]
    assert meta["command"]  # how it was run
    card = model_card.model_card(os.path.join(workdir, "model"))
    assert "weights stored as float16" in card and "20 steps of 16, 5 epochs" in card
    assert f"{meta['train_cpu_s'] / 3600:.2f} h of process CPU time" in card
    accuracy = meta["accuracies"]["test"]
    assert f"{100 * accuracy['accuracy']:.2f}% ({accuracy['correct']}/32)" in card
    curve = [line for line in card.splitlines() if line.startswith("| ") and "%" in line]
    assert [line.split(" | ")[0] for line in curve] == ["| 1", "| 2", "| 3", "| 4", "| 5 (final)"]
    assert "nan" not in card
    stored = os.path.join(workdir, "model", "model.json")
    with open(stored) as f:
        description = json.load(f)
    del description["history"][0]["train_accuracy"]  # as a resume evaluating before a log
    with open(stored, "w") as f:
        json.dump(description, f)
    first = model_card.model_card(os.path.join(workdir, "model")).split("| 1 | ")[1]
    assert first.split(" | ")[1] == "-"  # no train accuracy: a dash, not "nan%"
    script = os.path.join(REPO, "scripts", "model_card.py")
    completed = subprocess.run(
        [sys.executable, script, str(tmp_path / "missing")], capture_output=True, text=True
    )
    assert completed.returncode != 0 and "no such directory" in completed.stderr


def checkpointed_step(workdir) -> int:
    with open(os.path.join(workdir, "checkpoints", train.TRAIN_STATE_FILE), "rb") as f:
        return int(serialization.msgpack_restore(f.read())["state"]["step"])


def start_long_run(workdir, data_dir, *flags) -> tuple[subprocess.Popen, list[str]]:
    """scripts/train.py on a tiny NiN with steps to spare, once it has logged steps; and
    the lines it logged until then."""
    process = subprocess.Popen(
        [
            sys.executable,
            os.path.join(REPO, "scripts", "train.py"),
            f"--config={os.path.join(REPO, 'configs', 'train_default.py')}",
            f"--workdir={workdir}",
            "--config.model=nin",
            "--config.model_overrides.width=0.125",
            f"--config.dataset=folder:{data_dir}",
            "--config.exact_test_data=",
            "--config.batch_size=16",
            "--config.num_steps=100000",
            "--config.log_every=2",
            "--config.cpu_devices=1",
            *flags,
        ],
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags()),
    )
    lines = []
    for line in process.stderr:  # absl logs to stderr
        lines.append(line)
        if "/100000 epoch" in line:
            return process, lines
    raise AssertionError(f"no training step logged (exit {process.wait()}): {lines[-5:]}")


def test_sigterm_checkpoints_and_time_bounds_what_a_kill_loses(dataset, tmp_path):
    """SIGTERM: a checkpoint after the step in progress, exit 143, and the same command
    resumes from it. SIGKILL: `checkpoint_every_seconds` checkpointed on the way although
    no step count was due."""
    terminated = tmp_path / "terminated"
    process, _ = start_long_run(terminated, dataset, "--config.checkpoint_every=100000")
    process.send_signal(signal.SIGTERM)
    rest = process.stderr.read()
    assert process.wait(timeout=120) == 143, rest[-2000:]
    step = checkpointed_step(terminated)
    assert step >= 2 and f"stopping after step {step} (SIGTERM)" in rest
    resumed, lines = start_long_run(terminated, dataset, "--config.checkpoint_every=100000")
    resumed.kill()
    resumed.wait()
    assert any(f"resumed from {terminated} at step {step}" in line for line in lines)

    killed = tmp_path / "killed"
    process, _ = start_long_run(
        killed, dataset, "--config.checkpoint_every=100000", "--config.checkpoint_every_seconds=0.2"
    )
    # Keep reading its log, so that a full pipe never blocks the run before it checkpoints.
    threading.Thread(target=process.stderr.read, daemon=True).start()
    deadline = time.time() + 60
    path = os.path.join(killed, "checkpoints", train.TRAIN_STATE_FILE)
    while not os.path.exists(path) and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    process.kill()
    process.wait()
    assert 2 <= checkpointed_step(killed) < 100000
