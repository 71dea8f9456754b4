"""Mergeable metrics and reports over workdirs of hand-made records."""

import json
import subprocess
import sys

import numpy as np
import pytest
from test_run import REPO, SIZE, tiny_config, write_images

from opa_jax import metrics, report
from opa_jax import workdir as workdir_lib
from opa_jax.errors import InputError

NUM_CLASSES = 4


def make_record(image, true_label, target_label=None, success=False, adv_label=None,
                adv_prob=0.5, perturbation=(), queries=100, num_classes=NUM_CLASSES,
                **extra):  # fmt: skip
    """A results.jsonl record; the adversarial label defaults to the target, else true + 1."""
    if adv_label is None:
        default_adv = target_label if target_label is not None else (true_label + 1) % num_classes
        adv_label = default_adv if success else true_label
    adv_probs = np.full(num_classes, (1 - adv_prob) / (num_classes - 1))
    adv_probs[adv_label] = adv_prob
    clean_probs = np.full(num_classes, 0.1 / (num_classes - 1))
    clean_probs[true_label] = 0.9
    return {
        "image": image, "true_label": true_label, "target_label": target_label,
        "success": success, "adv_label": adv_label, "adv_prob": adv_prob,
        "clean_probs": clean_probs.tolist(), "adv_probs": adv_probs.tolist(),
        "perturbation": [list(p) for p in perturbation], "generations": max(queries // 10 - 1, 0),
        "queries": queries, "pixels": 1, "model": "m", "method": "de:paper", **extra,
    }  # fmt: skip


def random_records(rng, n):
    records = []
    for i in range(n):
        true = i % 7 % NUM_CLASSES  # image i % 7 has one true class
        target = None if rng.random() < 0.5 else int((true + rng.integers(1, NUM_CLASSES)) % 4)
        records.append(make_record(i % 7, true, target, success=bool(rng.random() < 0.6),
                                   adv_prob=float(rng.uniform(0.3, 1.0)),
                                   queries=int(rng.integers(1, 50)) * 10))  # fmt: skip
    return records


# ---------------------------------------------------------------------------
# Metrics.


def test_merged_tallies_equal_one_tally_over_everything():
    records = random_records(np.random.default_rng(0), 60)
    whole = metrics.Tally(NUM_CLASSES).update(records).summary()
    parts = [records[:7], records[7:30], records[30:]]  # e.g. chunks, hosts, resumed runs
    merged = metrics.Tally(NUM_CLASSES)
    for part in parts:
        merged = merged.merge(metrics.Tally(NUM_CLASSES).update(part))
    merged = merged.summary()
    assert merged.keys() == whole.keys()
    for key, value in whole.items():
        if isinstance(value, float) or key.endswith("_ci95"):  # sums in another order
            assert merged[key] == pytest.approx(value), key
        else:
            assert merged[key] == value, key
    assert 0 < whole["successes"] < whole["attacks"] == 60
    assert whole["images"] == 7  # an image attacked in several parts counts once


def test_number_of_target_classes_and_pairs_on_hand_made_records():
    records = [
        # Image 0 (class 0) reaches targets 1 and 3, not 2.
        make_record(0, 0, 1, success=True, adv_prob=0.8),
        make_record(0, 0, 2, success=False),
        make_record(0, 0, 3, success=True, adv_prob=0.6),
        # Image 1 (class 1) reaches nothing.
        make_record(1, 1, 0), make_record(1, 1, 2), make_record(1, 1, 3),
        # Image 2 (class 2) reaches target 0 only.
        make_record(2, 2, 0, success=True, adv_prob=0.7), make_record(2, 2, 1),
        # Image 3 (class 3) reaches all three targets.
        make_record(3, 3, 0, success=True, adv_prob=1.0),
        make_record(3, 3, 1, success=True, adv_prob=1.0),
        make_record(3, 3, 2, success=True, adv_prob=0.9),
    ]  # fmt: skip
    summary = metrics.Tally(NUM_CLASSES).update(records).summary()
    assert summary["num_target_classes"] == [1, 1, 1, 1]  # 0, 1, 2 and 3 classes reached
    assert summary["attacks"] == 11 and summary["successes"] == 6
    assert summary["success_rate"] == pytest.approx(6 / 11)
    assert summary["confidence"] == pytest.approx((0.8 + 0.6 + 0.7 + 1.0 + 1.0 + 0.9) / 6)
    assert summary["pair_counts"] == [[0, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]]
    assert summary["pair_attempts"] == [[0, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert summary["adv_label_counts"] == [2, 2, 1, 1]


# ---------------------------------------------------------------------------
# Reports.


def write_workdir(path, config, records, hosts=1):
    """A workdir as run.run_attack leaves it (records split across host files if asked)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(
        json.dumps(workdir_lib.config_identity(config, workdir_lib.EXECUTION_FIELDS))
    )
    names = (
        ["results.jsonl"] if hosts == 1 else [f"results.host{h:03d}.jsonl" for h in range(hosts)]
    )
    for h, name in enumerate(names):
        with open(path / name, "w") as f:
            for record in records[h::hosts]:
                f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture
def images_setup(tmp_path):
    """Eight 8x8 images, all of one grey, so every changed pixel is visible."""
    images = np.full((8, SIZE, SIZE, 3), 100, np.uint8)
    images[:, 0, 0] = (10, 20, 30)  # the pixel that one record rewrites unchanged
    labels = [i % NUM_CLASSES for i in range(8)]
    write_images(tmp_path / "data", images, labels, num_classes=NUM_CLASSES)
    setup = {"data": f"folder:{tmp_path / 'data'}", "model": "keras:unused.h5"}
    return setup, images, labels


def test_perturbation_is_written_at_row_x_column_y():
    image = np.zeros((4, 6, 3), np.uint8)
    out = report.apply_perturbation(image, [[1, 4, 255, 128, 7], [3, 0, 1, 2, 3]])
    assert out[1, 4].tolist() == [255, 128, 7] and out[3, 0].tolist() == [1, 2, 3]
    assert np.count_nonzero(out.any(-1)) == 2 and not image.any()  # the input is untouched


def test_report_tables_and_figures(images_setup, tmp_path):
    setup, images, labels = images_setup
    de_records = [
        make_record(i, labels[i], success=i < 6, adv_prob=0.5 + 0.05 * i,
                    perturbation=[(i % SIZE, 7, 255, 0, 0)], queries=400 * (i + 1))
        for i in range(8)
    ]  # fmt: skip
    de_records[0]["perturbation"] = [[0, 0, 10, 20, 30]]  # rewrites a pixel with its own colour
    de_dir = write_workdir(tmp_path / "de_1px", tiny_config(setup), de_records, hosts=2)
    fgsm_records = [
        make_record(i, labels[i], success=i < 2, perturbation=(), queries=1, l0_pixels=60,
                    linf=8.0, method="fgsm")
        for i in range(8)
    ]  # fmt: skip
    fgsm_dir = write_workdir(tmp_path / "fgsm", tiny_config(setup, method="fgsm"), fgsm_records)
    targeted_records = [
        make_record(i, labels[i], t, success=(i + t) % 3 == 0, perturbation=[(1, 1, 0, 0, 0)])
        for i in range(4) for t in range(NUM_CLASSES) if t != labels[i]
    ]  # fmt: skip
    targeted_dir = write_workdir(
        tmp_path / "targeted", tiny_config(setup, targeted=True), targeted_records
    )
    three_px_records = [
        make_record(i, labels[i], success=True, perturbation=[(1, 1, 0, 0, 0)] * 3)
        for i in range(4)
    ]
    three_px_dir = write_workdir(
        tmp_path / "de_3px", tiny_config(setup, pixels=3), three_px_records
    )
    out = tmp_path / "report"
    workdirs = [de_dir, fgsm_dir, targeted_dir, three_px_dir]
    path = report.write_report([str(w) for w in workdirs], str(out))
    text = open(path).read()
    # Every column, worked out by hand. de_1px: successes i < 6 with adv_prob 0.5 + 0.05 i
    # (confidence 62.5%), each image its own (6 of 8 reached), queries 400 (i + 1) (mean
    # 1800; 1400 over the successes). fgsm: 2 of 8, adv_prob 0.5, one query each.
    # targeted: (i + t) % 3 == 0 holds for one target of each of the 4 images.
    summary_rows = [
        "| de_1px | unused | 1 | non-targeted | DE (paper, 16x50) | 8 | 8 | 75.0% | 62.5% "
        "| 75.0% | 1800 | 1400 |",
        "| fgsm | unused | - | non-targeted | FGSM (eps 8) | 8 | 8 | 25.0% | 50.0% | 25.0% "
        "| 1 | 1 |",
        "| targeted | unused | 1 | targeted | DE (paper, 16x50) | 4 | 12 | 33.3% | 50.0% "
        "| 100.0% | 100 | 100 |",
        "| de_3px | unused | 3 | non-targeted | DE (paper, 16x50) | 4 | 4 | 100.0% | 50.0% "
        "| 100.0% | 100 | 100 |",
    ]  # fmt: skip
    lines = text.splitlines()
    header = lines.index(
        "| run | model | pixels | mode | method | images | attacks | success rate | confidence "
        "| images with >= 1 success | mean queries | mean queries (successes) |"
    )
    assert lines[header + 2 : header + 6] == summary_rows  # the DE run's two host files merged
    # 95% intervals: Wilson 6/8 is 40.9-92.9%; the targeted run fooled all 4 images.
    assert "| de_1px | 75.0% | 40.9-92.9% | 62.5% |" in text
    assert "| 4/4 | 51.0-100.0% |" in text
    # Success by pixel count: the 1 and 3 pixel runs of one model, mode and method.
    assert "| unused | non-targeted | DE (paper, 16x50) | 75.0% (8) | 100.0% (4) |" in text
    assert "| unused | targeted | DE (paper, 16x50) | 33.3% (12) | - |" in text
    # The comparison: DE changed 1 pixel in 7 records and none in one (same colour);
    # its L-inf is 255 - 100 = 155 where it changed something (mean 135.6).
    assert "## DE, random search and FGSM" in text
    comparison = text[text.index("## DE, random search and FGSM") :].splitlines()
    comparison = [line for line in comparison if line.startswith("| unused | non-t")]
    de_method = "| unused | non-targeted | DE (paper, 16x50) |"
    assert comparison == [
        f"{de_method} 1 | 8 | 75.0% | 62.5% | 1800 | 0.9 | 135.6 |",
        f"{de_method} 3 | 4 | 100.0% | 50.0% | 100 | 1.0 | 100.0 |",  # 3 px on one place
        "| unused | non-targeted | FGSM (eps 8) | - | 8 | 25.0% | 50.0% | 1 | 60.0 | 8.0 |",
    ]
    figures = ["success_by_pixels.png", "target_classes.png", "adversarial_labels.png",
               "pairs_de_1px.png", "pairs_fgsm.png", "pairs_targeted.png",
               "examples_de_1px.png", "examples_targeted.png"]  # fmt: skip
    for name in figures:
        assert f"]({name})" in text
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "examples_fgsm.png").exists()  # FGSM records hold no pixels to draw
    assert "## Notes" not in text  # every dataset was found


def test_report_script_and_bad_workdir(images_setup, tmp_path):
    setup, _, labels = images_setup
    records = [make_record(i, labels[i], success=True, perturbation=[(2, 2, 0, 0, 0)])
               for i in range(3)]  # fmt: skip
    config = tiny_config(setup, data=f"folder:{tmp_path / 'gone'}")
    workdir = write_workdir(tmp_path / "run", config, records)
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "report.py"), str(workdir),
         f"--out={tmp_path / 'out'}"], capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    text = (tmp_path / "out" / "report.md").read_text()
    row = "| run | unused | 1 | non-targeted | DE (paper, 16x50) | 3 | 3 | 100.0% | 50.0% | 100.0% "
    assert row + "| 100 | 100 |" in text.splitlines()
    assert "run: no example images (dataset folder" in text and "gone" in text
    with pytest.raises(InputError, match="no config.json"):
        report.write_report([str(tmp_path)], str(tmp_path / "out2"))


def test_relative_data_path_is_read_from_where_the_run_started(images_setup, tmp_path, monkeypatch):
    """A config's relative data path is relative to the directory the attack ran in
    (run_info.json's `cwd`), wherever the report is written from."""
    setup, _, labels = images_setup
    config = tiny_config({**setup, "data": "folder:data"})  # relative to tmp_path
    workdir = write_workdir(tmp_path / "run", config, [make_record(0, labels[0])])
    (workdir / "run_info.json").write_text(json.dumps({"cwd": str(tmp_path)}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    dataset, reason = report.open_dataset(report.load_run_results(str(workdir)))
    assert reason is None and len(dataset) == 8
    (workdir / "run_info.json").write_text(json.dumps({"cwd": str(elsewhere)}))
    dataset, reason = report.open_dataset(report.load_run_results(str(workdir)))
    assert dataset is None and "not found" in reason


def test_example_images_come_from_the_alternative_the_run_read(images_setup, tmp_path,
                                                               monkeypatch):  # fmt: skip
    """A config's `folder:A|tfds:B` data (the CIFAR-10 configs'): the report reads the
    first alternative found here, as the run did, and names every folder when none is."""
    setup, _, labels = images_setup
    config = tiny_config({**setup, "data": "folder:data|tfds:not_prepared_here"})
    workdir = write_workdir(tmp_path / "run", config, [make_record(0, labels[0])])
    (workdir / "run_info.json").write_text(json.dumps({"cwd": str(tmp_path)}))
    monkeypatch.chdir(tmp_path / "run")
    dataset, reason = report.open_dataset(report.load_run_results(str(workdir)))
    assert reason is None and len(dataset) == 8
    config = tiny_config({**setup, "data": "folder:gone|folder:also_gone"})
    workdir = write_workdir(tmp_path / "run2", config, [make_record(0, labels[0])])
    dataset, reason = report.open_dataset(report.load_run_results(str(workdir)))
    assert dataset is None and reason == "dataset folder 'gone' or 'also_gone' not found"


def test_accuracy_table_over_the_images_considered(images_setup, tmp_path):
    """Clean and robust accuracy rows from run_info.json's images considered: a finished
    run, one with a correct image not attacked yet, and kept records from before
    run_info.json held the count (no row)."""
    setup, _, labels = images_setup
    records = [make_record(i, labels[i], success=i < 3) for i in range(6)]
    misclassified = make_record(6, labels[6], success=True)  # attacked, only_correct=False
    misclassified["clean_probs"] = list(reversed(misclassified["clean_probs"]))
    runs = {}
    for name, kept, considered in (("done", records + [misclassified], {"images_considered": 8,
                                    "clean_correct": 6}),
                                   ("going", records[:5], {"images_considered": 8,
                                    "clean_correct": 6}),
                                   ("kept", records, None)):  # fmt: skip
        workdir = write_workdir(tmp_path / name, tiny_config(setup), kept)
        if considered:
            (workdir / "run_info.json").write_text(json.dumps(considered))
        runs[name] = report.load_run_results(str(workdir))
    table = report.accuracy_table(list(runs.values())).splitlines()
    # done: 6 of 8 correct (75.0%, Wilson 40.9-92.9%); images 0-2 fooled, 3-5 robust: 3/8.
    # The misclassified image's success counts in the success rate (4 of 7), not as robust.
    assert table[2] == "| done | 8 | 75.0% (6) | 40.9-92.9% | 37.5% (3) | 13.7-69.4% | 57.1% |"
    assert table[3].startswith("| going | 8 | 75.0% (6) | 40.9-92.9% | - (run not finished) |")
    assert len(table) == 4  # the kept run has no row
    assert report.accuracy_table([runs["kept"]]) is None
