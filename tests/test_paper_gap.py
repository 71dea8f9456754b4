"""The paper-gap tables: Newcombe's intervals against his published values, and the
Markdown, figures and factor rows over a tiny model and hand-made runs."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import realdata
from conftest import xla_flags
from test_report import make_record, write_workdir
from test_run import REPO, SIZE, tiny_config, write_images, write_tiny_keras

from opa_jax import attack, paper_gap
from opa_jax.errors import InputError
from opa_jax.models import load_model

NUM_IMAGES = 12
NUM_CLASSES = 10


# ---------------------------------------------------------------------------
# Intervals.


@pytest.mark.parametrize(
    "table, expected",
    [  # Newcombe 1998 (Stat. Med. 17:2635), method 10, his examples (a)-(d)
        ((36, 12, 2, 0), (0.0569, 0.3404)),
        ((18, 12, 2, 18), (0.0562, 0.3290)),
        ((53, 0, 0, 1), (-0.0729, 0.0729)),
        ((0, 30, 0, 0), (0.8395, 1.0)),
        # Fagerland, Lydersen & Laake, Statistical Analysis of Contingency Tables, Ch. 8:
        # complete response before and after consolidation (Cavo et al. 2012)
        ((59, 6, 16, 80), (-0.1186, -0.0046)),
    ],
)
def test_paired_interval_matches_newcombes_published_values(table, expected):
    assert paper_gap.paired_difference_interval(*table) == pytest.approx(expected, abs=6e-5)


@pytest.mark.parametrize(
    "counts, expected",
    [  # Newcombe 1998 (Stat. Med. 17:873), method 10, examples (a) and (b)
        ((56, 70, 48, 80), (0.0524, 0.3339)),
        ((9, 10, 3, 10), (0.1705, 0.8090)),
    ],
)
def test_unpaired_interval_matches_newcombes_published_values(counts, expected):
    assert paper_gap.unpaired_difference_interval(*counts) == pytest.approx(expected, abs=6e-5)


def test_intervals_are_symmetric_in_swapping_the_conditions():
    low, high = paper_gap.paired_difference_interval(20, 7, 3, 70)
    assert paper_gap.paired_difference_interval(20, 3, 7, 70) == pytest.approx((-high, -low))
    low, high = paper_gap.unpaired_difference_interval(30, 100, 21, 100)
    assert paper_gap.unpaired_difference_interval(21, 100, 30, 100) == pytest.approx((-high, -low))
    assert low < 0.09 < high  # holds the point estimate


def test_entries_from_flags():
    entries = paper_gap.parse_entries(
        ["nin:ckpt:checkpoints/cifar10/nin", "vgg16:ckpt:x"],
        ["nin:a,b", "nin:c", "vgg16:d"],
    )
    assert [(e.name, e.spec, e.workdirs) for e in entries] == [
        ("nin", "ckpt:checkpoints/cifar10/nin", ("a", "b", "c")),
        ("vgg16", "ckpt:x", ("d",)),
    ]
    with pytest.raises(InputError, match="no --model is named 'allconv'"):
        paper_gap.parse_entries(["nin:ckpt:x"], ["allconv:a"])
    with pytest.raises(InputError, match="NAME:SPEC"):
        paper_gap.parse_entries(["nin"], [])
    with pytest.raises(InputError, match="given twice"):
        paper_gap.parse_entries(["nin:ckpt:x", "nin:ckpt:y"], [])


# ---------------------------------------------------------------------------
# A tiny model, its images, and hand-made runs on them.


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny Keras model on 12 random 8x8 images, labelled by its predictions except
    images 10 and 11 (misclassified), and its clean probabilities."""
    root = tmp_path_factory.mktemp("tiny")
    model_spec = f"keras:{write_tiny_keras(root / 'tiny.h5')}"
    images = np.random.default_rng(0).integers(0, 256, (NUM_IMAGES, SIZE, SIZE, 3), np.uint8)
    probs = attack.predict_probs(load_model(model_spec), images)
    labels = probs.argmax(-1)
    labels[10:] = (labels[10:] + 1) % NUM_CLASSES
    write_images(root / "data", images, labels)
    setup = {"model": model_spec, "data": f"folder:{root / 'data'}", "root": root}
    return setup, probs, labels


def record(probs, labels, image, success=False, target=None, **extra):
    return make_record(
        image,
        int(labels[image]),
        target,
        success=success,
        num_classes=NUM_CLASSES,
        clean_probs=probs[image].tolist(),
        **extra,
    )


def write_runs(setup, probs, labels, root: pathlib.Path) -> dict:
    """DE fools images {0, 1, 5} of 0-9; the complete exhaustive search {0, 1, 2, 3};
    targeted DE on 0-4 pushes 0 and 3 to one target each."""
    de = [record(probs, labels, i, success=i in (0, 1, 5)) for i in range(10)]
    exhaustive = []
    for i in range(10):
        reached = [(int(labels[i]) + k) % NUM_CLASSES for k in range(1, 1 + (i == 2) + (i < 4))]
        exhaustive.append(
            record(probs, labels, i, success=bool(reached), classes_reached=reached)
            | {"search_complete": True, "fooling_positions": len(reached)}
        )
    targeted = [
        record(probs, labels, i, success=(i, k) in ((0, 1), (3, 2)), target=target)
        for i in range(5)
        for k, target in enumerate(c for c in range(NUM_CLASSES) if c != labels[i])
    ]
    base = dict(num_images=10, pixels=1)
    return {
        "de": write_workdir(root / "de", tiny_config(setup, **base), de),
        "exhaustive": write_workdir(
            root / "exhaustive",
            tiny_config(setup, method="exhaustive", **{"exhaustive.stop": "none"}, **base),
            exhaustive,
        ),
        "targeted": write_workdir(
            root / "targeted", tiny_config(setup, targeted=True, num_images=5), targeted
        ),
    }


@pytest.fixture(scope="module")
def measured(tiny, tmp_path_factory):
    setup, probs, labels = tiny
    runs = write_runs(setup, probs, labels, tmp_path_factory.mktemp("runs"))
    other = tmp_path_factory.mktemp("runs_other") / "de"
    fewer = [record(probs, labels, i, success=i < 6) for i in range(8)]
    write_workdir(other, tiny_config(setup, num_images=8, pixels=1), fewer)
    entries = [
        paper_gap.ModelEntry("nin", setup["model"], tuple(str(w) for w in runs.values())),
        paper_gap.ModelEntry("nin_no_smoothing", setup["model"], (str(other),)),
    ]
    return paper_gap.measure_all(entries, setup["data"], setup["data"], batch_size=5), runs


def test_accuracies_and_margins_of_the_tiny_model(tiny, measured):
    _, probs, labels = tiny
    nin = measured[0][0]
    assert nin.exact == (10, 12) and nin.jpeg == (10, 12)  # images 10 and 11 mislabelled
    np.testing.assert_array_equal(nin.images, np.arange(10))
    np.testing.assert_allclose(nin.p_true, probs[np.arange(10), labels[:10]], rtol=1e-5)
    top2 = np.sort(np.log(probs[:10]), -1)[:, -2:]
    np.testing.assert_allclose(nin.margin, top2[:, 1] - top2[:, 0], rtol=1e-4, atol=1e-4)
    assert (nin.margin > 0).all()  # every attacked image is classified correctly
    assert nin.record_prob_diff < 1e-6


def test_run_outcomes(measured):
    nin = measured[0][0]
    de, exhaustive, targeted = nin.runs
    assert (de.kind, exhaustive.kind, targeted.kind) == ("de", "exhaustive", "de_targeted")
    assert de.fooled_count == 3 and exhaustive.fooled_count == 4 and exhaustive.complete
    assert exhaustive.classes_reached == {0: 1, 1: 1, 2: 2, 3: 1, **{i: 0 for i in range(4, 10)}}
    assert targeted.fooled == {0: True, 1: False, 2: False, 3: True, 4: False}
    assert targeted.targets_per_image == NUM_CLASSES - 1
    assert paper_gap.best_run(nin.runs, "exhaustive") is exhaustive


def test_factor_rows(measured):
    rows = {(r.factor, r.model): r for r in paper_gap.factor_rows(measured[0])}
    search = rows["search", "nin"]
    assert (search.share_a, search.share_b) == (0.4, 0.3)  # exhaustive 4/10, DE 3/10
    # both {0, 1}, exhaustive only {2, 3}, DE only {5}, neither 5
    assert search.interval == paper_gap.paired_difference_interval(2, 2, 1, 5)
    protocol = rows["protocol", "nin"]
    assert protocol.points == 0 and "equal by construction" in protocol.note
    targeted = rows["protocol (DE)", "nin"]
    assert targeted.images == "5, paired" and targeted.points == pytest.approx(0.0)
    assert targeted.interval == paper_gap.paired_difference_interval(1, 1, 1, 2)
    smoothing = rows["label smoothing", "nin_no_smoothing vs nin"]
    # nin_no_smoothing has DE only, so both models are compared by DE: 6/8 against 3/10
    assert (smoothing.share_a, smoothing.share_b) == (6 / 8, 0.3)
    assert smoothing.interval == paper_gap.unpaired_difference_interval(6, 8, 3, 10)
    assert smoothing.comparison.endswith("DE, each model on its own images")
    assert rows["paper recipe", "nin_plain vs nin"].note.startswith("not measured: needs")
    images = rows["images", "nin_other_images vs nin"]  # the shipped NiN on other images
    assert images.note.startswith("not measured: needs a model named nin_other_images")
    no_search = rows["search", "nin_no_smoothing"]
    assert no_search.share_a is None and "exhaustive" in no_search.note


def test_markdown_and_figures(measured, tmp_path):
    path = paper_gap.write_report(measured[0], str(tmp_path / "out"), "python x.py")
    text = pathlib.Path(path).read_text()
    factor_lines = [line for line in text.splitlines() if line.startswith("| search |")]
    assert len(factor_lines) == 2
    assert "| +10.0 |" in factor_lines[0] and "Newcombe paired (method 10)" in factor_lines[0]
    assert "| label smoothing | nin_no_smoothing vs nin |" in text
    assert "Newcombe independent (method 10)" in text
    recipe = next(line for line in text.splitlines() if line.startswith("| paper recipe |"))
    assert "not measured: needs a model named nin_plain" in recipe
    assert "| nin | 71.66% |" in text  # the paper's figure beside ours
    assert "10/12 (83.3%" in text  # the accuracy, both test sets
    assert "| 4/10 (40.0%, 95% 16.8-68.7%) = fooled |" in text  # >= 1 class, complete search
    assert "| 2/5 (40.0%, 95% 11.8-76.9%) |" in text  # pushed to >= 1 target, targeted DE
    for name in ("fooled_by_margin.png", "margins.png"):
        assert f"]({name})" in text
        size = (tmp_path / "out" / name).stat().st_size
        assert 0 < size < 80_000, (name, size)


def test_the_first_edge_holds_the_smallest_margin_and_bins_count_every_image(measured):
    measures = measured[0]
    edges = paper_gap.margin_bins(measures, num_bins=3)
    assert edges[0] == min(m.margin.min() for m in measures)
    for m in measures:
        run, _ = m.fooled_for_plot()
        bins = paper_gap.fooled_by_margin(m, edges)
        assert sum(n for n, _, _ in bins) == run.images
        assert sum(f for _, f, _ in bins) == run.fooled_count


def test_script_writes_the_report_and_refuses_bad_flags(tiny, measured, tmp_path):
    setup, _, _ = tiny
    runs = measured[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())
    flags = [
        f"--model=nin:{setup['model']}",
        f"--runs=nin:{runs['de']},{runs['exhaustive']}",
        f"--exact_data={setup['data']}",
        f"--jpeg_data=folder:{tmp_path / 'absent'}",
        f"--out={tmp_path / 'out'}",
    ]
    script = [sys.executable, str(REPO / "scripts" / "paper_gap.py")]
    done = subprocess.run([*script, *flags], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "out" / "paper_gap.md").read_text()
    assert "not measured: JPEG test set absent" in text and "scripts/paper_gap.py" in text
    bad = subprocess.run(
        [*script, *flags, "--runs=vgg16:x"], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and "no --model is named 'vgg16'" in bad.stderr


# ---------------------------------------------------------------------------
# The shipped NiN on the exact test images.


@pytest.mark.realdata
def test_shipped_nin_accuracy_and_margins_match_its_card_and_records():
    checkpoint = REPO / "checkpoints" / "cifar10" / "nin"
    realdata.require(realdata.CIFAR10_EXACT, checkpoint)
    run = REPO / "docs" / "runs" / "zoo_nin_1px"
    entry = paper_gap.ModelEntry("nin", f"ckpt:{checkpoint}", (str(run),))
    (nin,) = paper_gap.measure_all([entry], f"folder:{realdata.CIFAR10_EXACT}")
    card = json.loads((checkpoint / "model.json").read_text())["accuracies"]["exact_test"]
    assert nin.exact == (card["correct"], card["count"]) == (nin.exact[0], 1017)
    assert len(nin.images) == 100 and (nin.margin > 0).all()
    assert nin.record_prob_diff < 1e-5  # the records' clean probabilities, recomputed
    assert nin.runs[0].fooled_count == 21
