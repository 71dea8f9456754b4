"""The paper's table on the trained zoo (docs/results.md, issue 16) against the records
kept in docs/runs: every run is whole, its summary is its records' tally, and the
figures and claims the table publishes follow from the records."""

import json
import os

import pytest

from opa_jax import report

RECORDS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "runs")
PUBLISHED = {  # run -> (attacks, successes, images fooled), as docs/results.md gives them
    "zoo_nin_1px": (100, 21, 21),
    "zoo_nin_1px_scipy": (100, 21, 21),
    "zoo_allconv_1px": (100, 19, 19),
    "zoo_vgg16_1px": (100, 29, 29),
    "zoo_nin_3px": (100, 47, 47),
    "zoo_nin_5px": (100, 55, 55),
    "zoo_nin_1px_targeted": (270, 4, 3),
}


def load(name: str) -> report.RunResults:
    return report.load_run_results(os.path.join(RECORDS, name))


def fooled_images(name: str) -> set[int]:
    return {r["image"] for r in load(name).records if r["success"]}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_a_kept_run_is_whole_and_its_summary_is_its_records_tally(name):
    run = load(name)
    keys = [(r["image"], r["target_label"]) for r in run.records]
    assert len(set(keys)) == len(keys), f"{name}: an attack recorded twice"
    tally = run.tally.summary()
    assert (tally["attacks"], tally["successes"], tally["images_fooled"]) == PUBLISHED[name]
    with open(os.path.join(RECORDS, name, "summary.json")) as f:
        written = json.load(f)
    for key in ("attacks", "successes", "images_fooled", "num_target_classes", "pair_counts"):
        assert written[key] == tally[key], (name, key)
    for key in ("success_rate", "confidence", "mean_queries"):
        assert written[key] == pytest.approx(tally[key]), (name, key)


def test_the_1px_rows_attack_the_same_100_images_and_targeted_the_first_30():
    images = {name: {r["image"] for r in load(name).records} for name in PUBLISHED}
    first = images["zoo_nin_1px"]
    for name in ("zoo_nin_1px_scipy", "zoo_nin_3px", "zoo_nin_5px"):
        assert images[name] == first, name
    assert images["zoo_nin_1px_targeted"] == set(sorted(first)[:30])


def test_nin_successes_nest_from_one_to_three_to_five_pixels():
    one, three, five = (fooled_images(f"zoo_nin_{k}px") for k in (1, 3, 5))
    assert one <= three <= five
    assert (len(one), len(three), len(five)) == (21, 47, 55)
    assert fooled_images("zoo_nin_1px_scipy") == one  # the two presets fool the same images
    assert fooled_images("zoo_nin_1px_targeted") <= one  # targeted reaches only those
