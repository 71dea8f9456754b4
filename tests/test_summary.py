"""Summary statistics against values worked out by hand from a few records."""

import json

import pytest
from test_report import make_record
from test_run import tiny_config

from opa_jax import metrics
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
