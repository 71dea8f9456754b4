"""Summary statistics against values worked out by hand from a few records, and clean
and robust accuracy over the images a run considers."""

import json

import pytest
from test_records import MISLABELLED, NUM_IMAGES, config_for, tiny  # noqa: F401 (tiny: a fixture)
from test_report import make_record
from test_run import tiny_config

from opa_jax import metrics, report, run
from opa_jax import workdir as workdir_lib
from opa_jax.models import LoadedModel

NUM_CLASSES = 4


def hand_records():
    """Six attacks; successes are images 0, 2, 3 and 5.

    image  success  queries  generations  adv_prob
      0      yes       400        3         0.60
      1      no       4000       39         0.30
      2      yes      1200       11         0.90
      3      yes      2000       19         0.75
      4      no       4000       39         0.20
      5      yes       800        7         0.55
    """
    rows = [(0, True, 400, 0.60), (1, False, 4000, 0.30), (2, True, 1200, 0.90),
            (3, True, 2000, 0.75), (4, False, 4000, 0.20), (5, True, 800, 0.55)]  # fmt: skip
    # A population of 100: queries = 100 x (generations + 1).
    return [make_record(image, image % NUM_CLASSES, success=success, adv_prob=adv_prob,
                        queries=queries, generations=queries // 100 - 1)
            for image, success, queries, adv_prob in rows]  # fmt: skip


# By hand: all queries 400 + 4000 + 1200 + 2000 + 4000 + 800 = 12400 over 6 attacks;
# successes' queries 400, 1200, 2000, 800 (sorted 400, 800, 1200, 2000: median
# (800 + 1200) / 2); their generations 3, 11, 19, 7; their confidence 0.60, 0.90, 0.75,
# 0.55. A failed attack's adv_prob (the true class's, or another's) is never counted.
EXPECTED = {
    "attacks": 6,
    "images": 6,
    "successes": 4,
    "success_rate": 4 / 6,
    "mean_queries": 12400 / 6,
    "mean_queries_success": 4400 / 4,
    "median_queries_success": 1000.0,
    "mean_generations_success": 40 / 4,
    "confidence": 2.80 / 4,
}


def assert_summary(summary):
    for key, value in EXPECTED.items():
        assert summary[key] == pytest.approx(value, rel=1e-12), key


def test_tally_statistics_equal_the_hand_computed_values():
    summary = metrics.Tally(NUM_CLASSES).update(hand_records()).summary()
    assert_summary(summary)
    # An odd number of successes: the median is the middle one (drop image 5's 800).
    odd = metrics.Tally(NUM_CLASSES).update(hand_records()[:5]).summary()
    assert odd["median_queries_success"] == 1200.0
    assert odd["mean_queries_success"] == pytest.approx(3600 / 3)
    assert odd["mean_generations_success"] == pytest.approx(33 / 3)


def test_no_success_gives_zero_success_statistics_not_nan():
    failures = [r for r in hand_records() if not r["success"]]
    summary = metrics.Tally(NUM_CLASSES).update(failures).summary()
    assert summary["successes"] == 0 and summary["success_rate"] == 0.0
    assert summary["mean_queries"] == 4000.0
    for key in ("confidence", "mean_queries_success", "median_queries_success",
                "mean_generations_success"):  # fmt: skip
        assert summary[key] == 0.0, key


def test_summary_json_of_a_workdir_holds_the_hand_computed_values(tmp_path):
    """The summary a run writes is computed from its results file(s), merged across hosts."""
    records = hand_records()
    for host, share in enumerate((records[::2], records[1::2])):
        with open(tmp_path / f"results.host{host:03d}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in share)
    config = tiny_config({"model": "keras:m.h5", "data": "folder:d"}, **{"de.preset": "scipy"})
    model = LoadedModel("m", None, {}, (8, 8, 3), NUM_CLASSES, ("a", "b", "c", "d"))
    returned = workdir_lib.write_summary(str(tmp_path), config, model)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written == returned
    assert_summary(written)
    assert written["method"] == "de:scipy" and written["class_names"] == ["a", "b", "c", "d"]
    # Successes' adversarial labels (true + 1): images 0, 2, 3, 5 reach 1, 3, 0, 2.
    assert written["adv_label_counts"] == [1, 1, 1, 1]


def test_wilson_interval_matches_published_values():
    # Wilson 95% intervals as tabulated (Newcombe 1998, Table I: 0/10, 5/10 and 81/263).
    for (k, n), (lo, hi) in {(0, 10): (0.0, 0.2775), (5, 10): (0.2366, 0.7634),
                             (81, 263): (0.2553, 0.3662)}.items():  # fmt: skip
        assert metrics.wilson_interval(k, n) == pytest.approx((lo, hi), abs=1e-4)
    assert metrics.wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_interval_reaches_exactly_0_and_1_at_the_ends():
    """At n/n the upper bound is 1.0 itself, not a rounding below it (10/10 once gave
    0.9999999999999999, and a plot's error bar below the point refused to draw)."""
    for n in range(1, 60):
        assert metrics.wilson_interval(n, n)[1] == 1.0
        assert metrics.wilson_interval(0, n)[0] == 0.0
        low, high = metrics.wilson_interval(n, n)
        assert low < 1.0 and low == pytest.approx(n / (n + metrics.Z_95**2))


def test_summary_intervals_of_the_hand_records():
    summary = metrics.Tally(NUM_CLASSES).update(hand_records()).summary()
    assert summary["success_rate_ci95"] == pytest.approx(metrics.wilson_interval(4, 6))
    lo, hi = summary["success_rate_ci95"]
    assert lo < 4 / 6 < hi
    # Every image is its own, so the share of images fooled is the success rate.
    assert summary["images_fooled"] == 4 and summary["images_fooled_rate"] == 4 / 6
    # Confidences 0.60, 0.90, 0.75, 0.55: mean 0.70, sample sd sqrt(0.025), n 4.
    half = metrics.Z_95 * (0.025 / 4) ** 0.5
    assert summary["confidence_ci95"] == pytest.approx((0.70 - half, 0.70 + half))


# ---------------------------------------------------------------------------
# Clean and robust accuracy (RobustBench's and AutoAttack's definitions).


def misclassified(record, predicted):
    """`record` for an image the model predicts as `predicted`, not its true label."""
    probs = [0.1 / (NUM_CLASSES - 1)] * NUM_CLASSES
    probs[predicted] = 0.9
    return {**record, "clean_probs": probs}


def test_robust_accuracy_counts_the_skipped_images_as_considered_and_not_robust():
    """only_correct: the six hand records are the correctly classified images among ten
    considered (four misclassified ones skipped on the way). Four are fooled, so two of
    the ten are robust; the success rate stays over the six attacks."""
    tally = metrics.Tally(NUM_CLASSES, images_considered=10, clean_correct=6)
    summary = tally.update(hand_records()).summary()
    assert_summary(summary)
    assert summary["images_considered"] == 10 and summary["clean_correct"] == 6
    assert summary["clean_accuracy"] == 0.6
    assert summary["robust_images"] == 2 and summary["robust_accuracy"] == 0.2
    assert summary["clean_accuracy_ci95"] == pytest.approx(metrics.wilson_interval(6, 10))
    assert summary["robust_accuracy_ci95"] == pytest.approx(metrics.wilson_interval(2, 10))
    # Robust accuracy = clean accuracy x (1 - success rate) over images here.
    assert summary["robust_accuracy"] == pytest.approx(0.6 * (1 - summary["success_rate"]))


def test_an_attacked_misclassified_image_is_never_robust():
    """only_correct=False: images 1 and 2 are misclassified, and attacked. Image 1's
    attack fails and image 2's succeeds; neither is robust, and neither is one of the
    correctly classified images fooled. Correct: 0, 3, 4, 5; fooled among them: 0, 3,
    5; robust: image 4 alone, of six."""
    records = hand_records()
    records[1] = misclassified(records[1], predicted=0)
    records[2] = misclassified(records[2], predicted=0)
    tally = metrics.Tally(NUM_CLASSES, images_considered=6, clean_correct=4)
    summary = tally.update(records).summary()
    assert summary["success_rate"] == 4 / 6  # as today: over every attack
    assert summary["clean_accuracy"] == 4 / 6
    assert summary["robust_images"] == 1 and summary["robust_accuracy"] == 1 / 6


def test_robust_accuracy_of_a_targeted_run_counts_an_image_fooled_by_any_target():
    records = [
        make_record(0, 0, 1, success=True), make_record(0, 0, 2),  # fooled by target 1
        make_record(1, 1, 0), make_record(1, 1, 2),  # robust
        make_record(2, 2, 0), make_record(2, 2, 1, success=True),  # fooled by target 1
    ]  # fmt: skip
    summary = metrics.Tally(NUM_CLASSES, images_considered=4, clean_correct=3)
    summary = summary.update(records).summary()
    assert summary["success_rate"] == 2 / 6
    assert summary["robust_images"] == 1 and summary["robust_accuracy"] == 1 / 4


def test_robust_accuracy_waits_for_every_correct_image_and_needs_the_images_considered():
    # Five of the six correctly classified images attacked so far: not yet known.
    partial = metrics.Tally(NUM_CLASSES, images_considered=10, clean_correct=6)
    summary = partial.update(hand_records()[:5]).summary()
    assert summary["clean_accuracy"] == 0.6
    assert summary["robust_images"] is None and summary["robust_accuracy"] is None
    # Records without the images considered (kept from before they were stored).
    unknown = metrics.Tally(NUM_CLASSES).update(hand_records()).summary()
    assert all(unknown[key] is None for key in metrics.ACCURACY_FIELDS)
    assert unknown["success_rate"] == 4 / 6


def test_merged_tallies_add_the_images_considered():
    records = hand_records()
    halves = [metrics.Tally(NUM_CLASSES, images_considered=c, clean_correct=k).update(part)
              for c, k, part in ((5, 3, records[:3]), (5, 3, records[3:]))]  # fmt: skip
    merged = halves[0].merge(halves[1]).summary()
    whole = metrics.Tally(NUM_CLASSES, images_considered=10, clean_correct=6)
    whole = whole.update(records).summary()
    for key in metrics.ACCURACY_FIELDS:
        assert merged[key] == pytest.approx(whole[key]), key


def test_summary_json_reads_the_images_considered_from_run_info(tmp_path):
    """Two hosts' records and process 0's run_info.json: the summary's robust accuracy
    is over the ten images the plan considered, not over the six attacked."""
    records = hand_records()
    for host, share in enumerate((records[::2], records[1::2])):
        with open(tmp_path / f"results.host{host:03d}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in share)
    (tmp_path / "run_info.json").write_text(
        json.dumps({"images_considered": 10, "clean_correct": 6})
    )
    config = tiny_config({"model": "keras:m.h5", "data": "folder:d"})
    model = LoadedModel("m", None, {}, (8, 8, 3), NUM_CLASSES, ("a", "b", "c", "d"))
    written = workdir_lib.write_summary(str(tmp_path), config, model)
    assert json.loads((tmp_path / "summary.json").read_text()) == written
    assert written["clean_accuracy"] == 0.6 and written["robust_accuracy"] == 0.2
    assert written["success_rate"] == 4 / 6


@pytest.fixture(scope="module")
def mislabelled(tiny):  # noqa: F811 (the fixture imported above)
    """test_records.py's tiny setup: images 1, 4 and 5 carry a label the model gets wrong."""
    return tiny


@pytest.mark.parametrize(
    "only_correct, considered, correct",
    # Six wanted. Images 1, 4 and 5 are misclassified: only_correct skips them to find
    # 0, 2, 3, 6, 7, 8 (nine considered); without it, 0-5 are attacked (three correct).
    [(True, 9, 6), (False, 6, 3)],
)
def test_a_run_counts_the_images_considered_and_survives_resume(
    mislabelled, tmp_path, only_correct, considered, correct
):
    config = config_for(mislabelled, only_correct=only_correct, num_images=6)
    workdir = str(tmp_path / "run")
    summary = run.run_attack(config, workdir)
    assert (summary["images_considered"], summary["clean_correct"]) == (considered, correct)
    records = workdir_lib.read_all_results(workdir)
    assert len(records) == 6
    fooled_correct = {r["image"] for r in records if r["success"]} - set(MISLABELLED)
    assert summary["robust_images"] == correct - len(fooled_correct)
    assert summary["robust_accuracy"] == pytest.approx((correct - len(fooled_correct)) / considered)
    assert summary["clean_accuracy_ci95"] == pytest.approx(
        metrics.wilson_interval(correct, considered)
    )
    # A rerun on the finished workdir resumes it (nothing to do) and tallies the same.
    again = run.run_attack(config, workdir)
    for key in metrics.ACCURACY_FIELDS:
        assert again[key] == summary[key], key
    # So does a report rebuilt from the records.
    tally = report.load_run_results(workdir).tally.summary()
    for key in metrics.ACCURACY_FIELDS:
        assert tally[key] == summary[key], key


def test_attack_images_gives_robust_accuracy_over_every_image_given(mislabelled):
    """The Python API: every image given is considered, the three misclassified ones
    skipped (only_correct) and counted as not robust."""
    import opa_jax

    images, labels = mislabelled["images"][:8], mislabelled["labels"][:8]  # 1, 4, 5 wrong
    model = mislabelled["loaded"]
    summary = opa_jax.attack_images(model, images, labels, popsize=16, generations=10).summary
    assert summary["attacks"] == 5 and summary["images_considered"] == 8
    assert summary["clean_correct"] == 5 and summary["clean_accuracy"] == 5 / 8
    robust = 5 - summary["images_fooled"]
    assert summary["robust_images"] == robust and summary["robust_accuracy"] == robust / 8
