"""The Python API (opa_jax.Model, attack_images, run_attack) and the adversarial-image export.

On the tiny synthetic setup of test_run.py: a Keras-format conv net on 8x8 images and
a folder dataset labelled by it.
"""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime
import pytest
from PIL import Image
from test_onnx_import import GraphBuilder
from test_run import (
    REPO,
    SIZE,
    assert_same_records,
    tiny_config,
    write_tiny_keras,
    write_tiny_setup,
)

import opa_jax
from opa_jax import data, export, run
from opa_jax import workdir as workdir_lib
from opa_jax.errors import InputError
from opa_jax.models import load_model

DE = {"popsize": 16, "generations": 50}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A CLI-style run (run.run_attack) on the tiny setup, non-targeted, all 16 images."""
    root = tmp_path_factory.mktemp("api")
    setup = write_tiny_setup(root)
    config = tiny_config(setup)
    workdir = root / "run"
    run.run_attack(config, str(workdir))
    setup["workdir"] = workdir
    setup["config"] = config
    setup["records"] = workdir_lib.read_all_results(str(workdir))
    dataset = data.load_dataset(setup["data"], "test", (SIZE, SIZE, 3))
    setup["dataset"] = dataset
    # One model object for the API tests: its compiled attack loop is reused across them.
    setup["api_model"] = opa_jax.Model.load(setup["model"])
    return setup


def test_attack_images_gives_the_records_of_a_run(tiny_run):
    dataset = tiny_run["dataset"]
    model = tiny_run["api_model"]
    result = opa_jax.attack_images(
        model, dataset.read(range(len(dataset))), dataset.labels, indices=dataset.indices,
        pixels=1, preset="paper", seed=0, slots=2, **DE,
    )  # fmt: skip
    want = tiny_run["records"]
    assert len(result.records) == len(want) == 16
    assert_same_records(result.records, want)
    by_image = {r["image"]: r for r in want}
    for record in result.records:
        assert record.keys() == by_image[record["image"]].keys()
        np.testing.assert_allclose(record["clean_probs"], by_image[record["image"]]["clean_probs"],
                                   atol=1e-6)  # fmt: skip
    assert result.summary["attacks"] == 16
    assert result.summary["successes"] == sum(r["success"] for r in want)
    columns = result.columns()
    assert columns["image"] == [r["image"] for r in result.records]
    assert columns["success"] == [r["success"] for r in result.records]


def test_attack_images_targeted_rows_and_per_image_targets(tiny_run):
    dataset = tiny_run["dataset"]
    model = tiny_run["api_model"]
    images, labels = dataset.read(range(4)), dataset.labels[:4]
    result = opa_jax.attack_images(
        model, images, labels, targeted=True, targets=[1, 2], slots=2, **DE
    )
    want = sorted((i, t) for i in range(4) for t in (1, 2) if t != labels[i])
    assert sorted((r["image"], r["target_label"]) for r in result.records) == want
    for record in result.records:
        assert record["success"] == (record["adv_label"] == record["target_label"])
    chosen = (labels + 1) % 10
    result = opa_jax.attack_images(model, images, labels, target_labels=chosen, slots=2, **DE)
    assert [r["target_label"] for r in result.records] == chosen.tolist()


def test_attack_images_refuses_bad_input(tiny_run):
    model = tiny_run["api_model"]
    images = tiny_run["dataset"].read(range(2))
    labels = tiny_run["dataset"].labels[:2]
    with pytest.raises(InputError, match=r"model expects \[N, 8, 8, 3\]"):
        opa_jax.attack_images(model, images[:, :4], labels)
    with pytest.raises(InputError, match="pixels 0-255"):
        opa_jax.attack_images(model, images / 255.0, labels)
    with pytest.raises(InputError, match=r"class indices in \[0, 10\)"):
        opa_jax.attack_images(model, images, [3, 10])
    with pytest.raises(InputError, match=r"unknown DE field\(s\) \['popsise'\]"):
        opa_jax.attack_images(model, images, labels, popsise=10)
    with pytest.raises(InputError, match="de.preset"):
        opa_jax.attack_images(model, images, labels, preset="fast")


class NchwProbabilities(nn.Module):
    """A model written for [0, 1] NCHW input, ending in a softmax."""

    @nn.compact
    def __call__(self, x):
        x = jnp.transpose(x, (0, 2, 3, 1))
        x = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))
        return jax.nn.softmax(nn.Dense(5, name="dense")(x.reshape(x.shape[0], -1)))


def test_from_flax_states_the_input_convention():
    module = NchwProbabilities()
    variables = module.init(jax.random.key(0), jnp.zeros((1, 3, 6, 6)))
    convention = opa_jax.InputConvention(scale=1 / 255, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.3))
    model = opa_jax.Model.from_flax(module, variables, image_shape=(6, 6, 3),
                                    input_convention=convention, layout="nchw",
                                    outputs="probabilities")  # fmt: skip
    assert model.num_classes == 5 and model.image_shape == (6, 6, 3)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 6, 6, 3)).astype(np.float32)
    x = (pixels / 255 - np.float32([0.5, 0.4, 0.3])) / np.float32([0.2, 0.2, 0.3])
    want = module.apply(variables, jnp.asarray(x.transpose(0, 3, 1, 2)))
    logits = model.apply_fn(model.params, pixels)
    np.testing.assert_allclose(jax.nn.softmax(logits), want, rtol=1e-5, atol=1e-7)
    with pytest.raises(InputError, match="returns 5 classes; num_classes=10"):
        opa_jax.Model.from_flax(module, variables, image_shape=(6, 6, 3), layout="nchw",
                                num_classes=10)  # fmt: skip
    with pytest.raises(InputError, match="does not run on"):
        opa_jax.Model.from_flax(module, variables, image_shape=(7, 7, 3), layout="nchw")
    with pytest.raises(InputError, match="returns shape"):
        opa_jax.Model.from_function(lambda p, x: x, None, image_shape=(6, 6, 3))


def test_run_attack_and_export_workdir(tiny_run, tmp_path):
    summary = opa_jax.run_attack(tiny_run["config"], str(tiny_run["workdir"]))  # resumes: done
    successes = [r for r in tiny_run["records"] if r["success"]]
    assert summary["successes"] == len(successes) > 0

    written = opa_jax.export_adversarial(str(tiny_run["workdir"]), str(tmp_path / "png"))
    assert written["images"] == len(successes)
    exported = data.load_dataset(f"folder:{tmp_path / 'png'}", "test", (SIZE, SIZE, 3))
    assert len(exported) == len(successes)
    model = load_model(tiny_run["model"])
    dataset = tiny_run["dataset"]
    for record in successes:
        folder = tmp_path / "png" / "test" / dataset.class_names[record["true_label"]]
        path = folder / f"{record['image']:05d}_adv{record['adv_label']}.png"
        adversarial = np.asarray(Image.open(path))
        clean = dataset.read([int(np.flatnonzero(dataset.indices == record["image"])[0])])[0]
        changed = np.argwhere(np.any(adversarial != clean, axis=-1))
        row, col, *rgb = record["perturbation"][0]
        assert changed.tolist() in ([[int(row), int(col)]], [])  # [] if the colour was already so
        assert adversarial[int(row), int(col)].tolist() == rgb
        probs = jax.nn.softmax(model.apply_fn(model.params, adversarial[None].astype(np.float32)))
        assert int(np.argmax(probs)) == record["adv_label"]

    written = opa_jax.export_adversarial(str(tiny_run["workdir"]), str(tmp_path / "npz"), "npz")
    arrays = np.load(written["path"])
    assert arrays["images"].shape == (len(successes), SIZE, SIZE, 3)
    assert arrays["images"].dtype == np.uint8
    assert arrays["indices"].tolist() == [r["image"] for r in successes]
    assert arrays["adv_labels"].tolist() == [r["adv_label"] for r in successes]
    assert arrays["target_labels"].tolist() == [-1] * len(successes)
    np.testing.assert_array_equal(arrays["perturbations"], [r["perturbation"] for r in successes])

    # The API's own result exports the same images.
    result = opa_jax.attack_images(
        tiny_run["api_model"], dataset.read(range(len(dataset))), dataset.labels,
        indices=dataset.indices, slots=2, **DE,
    )  # fmt: skip
    images, records = result.adversarial_images()
    np.testing.assert_array_equal(images.astype(np.uint8), arrays["images"])
    assert result.export(str(tmp_path / "api"), "npz")["images"] == len(successes)


def test_export_refuses_a_different_model(tiny_run, tmp_path):
    workdir = tmp_path / "copied"
    workdir.mkdir()
    for name in ("config.json", "results.jsonl"):
        (workdir / name).write_bytes((tiny_run["workdir"] / name).read_bytes())
    config = json.loads((workdir / "config.json").read_text())
    config["model"] = f"keras:{write_tiny_keras(tmp_path / 'other.h5', seed=7)}"
    (workdir / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="not classified as recorded"):
        export.export_workdir(str(workdir), str(tmp_path / "out"))
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "export_adversarial.py"), str(tmp_path / "none"),
         f"--out={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "no config.json" in done.stderr


def test_onnx_model_through_a_run_config(tiny_run, tmp_path):
    """`--config.model=onnx:...` with the input fields: the run's clean probabilities are
    onnxruntime's on the normalised images."""
    b = GraphBuilder(seed=4)
    x = b.op("Relu", [b.conv("images", 3, 4, pads=[1, 1, 1, 1])])
    path = b.save(tmp_path / "tiny.onnx", b.gemm(b.op("Flatten", [x]), 4 * SIZE * SIZE, 10),
                  input_shape=("N", 3, SIZE, SIZE))  # fmt: skip
    config = tiny_config(tiny_run, num_images=3, only_correct=False)
    config.model = f"onnx:{path}"
    config.onnx.normalization = "cifar10"
    run.run_attack(config, str(tmp_path / "run"))
    records = workdir_lib.read_all_results(str(tmp_path / "run"))
    assert len(records) == 3 and all(r["model"] == f"onnx:{path}" for r in records)
    dataset = tiny_run["dataset"]
    images = dataset.read(range(3)).astype(np.float32)
    cifar = opa_jax.InputConvention(scale=1 / 255, mean=(0.4914, 0.4822, 0.4465),
                                    std=(0.2470, 0.2435, 0.2616))  # fmt: skip
    normalised = (images / 255 - np.float32(cifar.mean)) / np.float32(cifar.std)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    logits = session.run(None, {"images": normalised.transpose(0, 3, 1, 2).astype(np.float32)})[0]
    probs = np.asarray(jax.nn.softmax(logits))
    got = {r["image"]: r["clean_probs"] for r in records}
    for position, index in enumerate(dataset.indices[:3]):
        np.testing.assert_allclose(got[int(index)], probs[position], atol=1e-5)


def test_example_runs(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "attack_flax_model.py"), f"--out={tmp_path}",
         "--num_images=4"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "success rate" in done.stdout
    reported = int(done.stdout.strip().splitlines()[-1].split()[0])
    assert len(list(tmp_path.rglob("*.png"))) == reported


def test_run_paths_are_read_from_where_the_run_started(tmp_path):
    (tmp_path / "start" / "data").mkdir(parents=True)
    started_in = str(tmp_path / "start")
    assert export.from_run_start("folder:data", started_in) == f"folder:{started_in}/data"
    assert export.from_run_start("folder:elsewhere", started_in) == "folder:elsewhere"
    assert export.from_run_start("random:nin", started_in) == "random:nin"
    assert export.from_run_start(f"onnx:{tmp_path}/m.onnx", started_in) == f"onnx:{tmp_path}/m.onnx"
    assert export.from_run_start("folder:data", "") == "folder:data"
