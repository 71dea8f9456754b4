"""The exhaustive grid, the corner search and the minimum-pixels run: known answers,
and records that depend on nothing but the images and the settings."""

import json

import jax
import numpy as np
import pytest
from test_engine import grey_images, only_red_pixel_logits, red_pixel_logits, toy_model
from test_run import tiny_config, write_tiny_setup

from opa_jax import attack, corner_search, exhaustive, run
from opa_jax.errors import InputError

KEY = jax.random.key(0)
# Corner colours in grid order: (0,0,0), (0,0,255), (0,255,0), (0,255,255), (255,0,0), ...
RED_FIRST = 4  # the first corner with red = 255
SCALE = 30.0


def grid(stop="first", popsize=64, colours="corners"):
    return exhaustive.ExhaustiveConfig((8, 8), colours=colours, stop=stop, popsize=popsize)


def attack_grid(config, fn=only_red_pixel_logits, n=3, slots=2, evaluator="full", **kw):
    return attack.attack_arrays(
        KEY,
        toy_model(fn),
        grey_images(n),
        np.zeros(n),
        config,
        num_slots=slots,
        evaluator=evaluator,
        **kw,
    )


def test_colour_sets():
    corners = exhaustive.colour_set("corners")
    assert corners.shape == (8, 3) and set(np.unique(corners)) == {0.0, 255.0}
    np.testing.assert_array_equal(corners[RED_FIRST], [255, 0, 0])
    levels = exhaustive.colour_set("levels:3")
    assert levels.shape == (27, 3) and set(np.unique(levels)) == {0.0, 128.0, 255.0}
    for bad in ("levels:1", "levels:x", "edges"):
        with pytest.raises(InputError, match="exhaustive.colours"):
            exhaustive.colour_set(bad)
    with pytest.raises(InputError, match="exhaustive.stop"):
        exhaustive.ExhaustiveConfig((8, 8), stop="best")


def test_first_stops_at_the_first_fooling_candidate_in_raster_order():
    result = attack_grid(grid("first"))
    assert result.success.all()
    position = 5 * 8 + 7  # the only pixel that changes the label
    np.testing.assert_array_equal(result.queries, position * 8 + RED_FIRST + 1)
    np.testing.assert_array_equal(result.perturbation[:, 0], [[5, 7, 255, 0, 0]] * 3)
    np.testing.assert_array_equal(result.adv_label, 1)
    np.testing.assert_array_equal(result.outputs["fooling_candidates"], 1)


def test_none_evaluates_the_whole_grid_and_counts_every_fooling_candidate():
    config = grid("none")
    result = attack_grid(config)
    assert result.success.all()
    np.testing.assert_array_equal(result.queries, 8 * 8 * 8)
    np.testing.assert_array_equal(result.generations, config.generations)
    # Every corner with red = 255 at (5, 7) fools: 4 candidates, 1 position, class 1.
    np.testing.assert_array_equal(result.outputs["fooling_candidates"], 4)
    fields = config.record_fields({k: v[0] for k, v in result.outputs.items()})
    assert fields["fooling_positions"] == 1 and fields["vulnerable_pixels"] == [5 * 8 + 7]
    assert fields["classes_reached"] == [1] and fields["search_complete"]


def test_an_image_nothing_fools_spends_the_whole_grid():
    def constant(params, images):
        return only_red_pixel_logits(params, images) * 0 + np.array([1.0, 0.0, 0.0], np.float32)

    result = attack_grid(grid("first"), fn=constant)
    assert not result.success.any()
    np.testing.assert_array_equal(result.queries, 512)


def test_targeted_grid_reaches_the_target():
    result = attack.attack_arrays(
        KEY,
        toy_model(red_pixel_logits),
        grey_images(2),
        np.zeros(2),
        grid("first"),
        target_labels=np.full(2, 2),
        num_slots=1,
        evaluator="full",
    )
    assert result.success.all()
    np.testing.assert_array_equal(result.adv_label, 2)
    # Pixel (1, 1) with blue = 255: the second corner, (0, 0, 255).
    np.testing.assert_array_equal(result.queries, (1 * 8 + 1) * 8 + 1 + 1)


@pytest.mark.parametrize("stop", ["first", "none"])
def test_records_do_not_depend_on_chunk_slots_or_evaluator(stop):
    def fn(params, images):  # a smooth model: many positions, several classes
        del params
        x = images.reshape(images.shape[0], -1) / 255.0
        weights = np.random.default_rng(0).normal(0, 1, (x.shape[1], 4)).astype(np.float32)
        robust = 1000.0 * (x.mean(-1) > 0.6)[:, None] * np.eye(4, dtype=np.float32)[0]
        return SCALE * (x - 100.0 / 255.0) @ weights + robust  # bright images hold class 0

    rng = np.random.default_rng(1)
    images = np.concatenate(
        [rng.integers(60, 200, (3, 8, 8, 3)), rng.integers(180, 250, (2, 8, 8, 3))]
    )
    images = images.astype(np.uint8)
    labels = np.asarray(jax.numpy.argmax(fn(None, images.astype(np.float32)), -1))
    model = toy_model(fn)
    model = type(model)("smooth", fn, {}, (8, 8, 3), 4)
    outcomes = []
    for popsize, slots, evaluator in ((64, 1, "full"), (100, 3, "incremental")):
        res = attack.attack_arrays(
            KEY, model, images, labels, grid(stop, popsize), num_slots=slots, evaluator=evaluator
        )
        outcomes.append(res)
    a, b = outcomes
    for field in ("success", "queries", "perturbation", "adv_label"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    for name in a.outputs:
        np.testing.assert_array_equal(a.outputs[name], b.outputs[name], err_msg=name)
    np.testing.assert_allclose(a.adv_probs, b.adv_probs, atol=1e-5)
    assert a.success.any() and not a.success.all()  # the test sees both outcomes


def test_corner_search_finds_a_two_pixel_answer_and_is_keyed_by_image():
    def needs_two(params, images):  # class 1 iff (5, 7) is red and (1, 1) is blue
        del params
        red, blue = images[:, 5, 7, 0], images[:, 1, 1, 2]
        both = red + blue - 420.0  # positive only when both are near 255; each one helps
        return jax.numpy.stack([jax.numpy.zeros_like(red), 0.2 * both], -1)

    config = corner_search.CornerSearchConfig((8, 8), num_pixels=2, popsize=32, generations=200)
    model = type(toy_model())("two", needs_two, {}, (8, 8, 3), 2)
    runs = [
        attack.attack_arrays(
            KEY, model, grey_images(3), np.zeros(3), config, num_slots=s, evaluator="full"
        )
        for s in (1, 3)
    ]
    assert runs[0].success.all()
    pixels = {tuple(p[:2]) for p in runs[0].perturbation[0]}
    assert pixels == {(5.0, 7.0), (1.0, 1.0)}
    assert set(np.unique(runs[0].perturbation[..., 2:])) <= {0.0, 255.0}
    np.testing.assert_array_equal(runs[0].queries, runs[1].queries)
    np.testing.assert_array_equal(runs[0].perturbation, runs[1].perturbation)
    np.testing.assert_array_equal(runs[0].queries % 32, 0)


def test_min_pixels_run_records_the_smallest_k_and_resumes(tmp_path):
    setup = write_tiny_setup(tmp_path / "setup")
    config = tiny_config(
        setup,
        method="min_pixels",
        num_images=6,
        **{
            "min_pixels.ks": "2,3",
            "min_pixels.popsize": 16,
            "min_pixels.generations": 5,
            "exhaustive.popsize": 64,
        },
    )
    summary = run.run_attack(config, str(tmp_path / "run"))
    records = [json.loads(line) for line in open(tmp_path / "run" / "results.jsonl")]
    assert len(records) == summary["attacks"] == 6
    stage1 = {r["image"]: r for r in map(json.loads, open(tmp_path / "run/stages/k1.jsonl"))}
    for r in records:
        assert r["method"] == "min_pixels"
        if stage1[r["image"]]["success"]:
            assert r["min_pixels"] == 1 and r["queries"] == stage1[r["image"]]["queries"]
        else:
            assert r["min_pixels"] in (2, 3, None)
            assert r["queries"] == sum(r["stage_queries"].values()) > 8 * 8 * 8
        assert r["success"] == (r["min_pixels"] is not None)
    found = [r["min_pixels"] for r in records if r["min_pixels"]]
    assert summary["fooled_by_k"] == {str(k): sum(m <= k for m in found) for k in (1, 2, 3)}
    # A rerun redoes nothing and gives the same summary.
    again = run.run_attack(config, str(tmp_path / "run"))
    assert again["fooled_by_k"] == summary["fooled_by_k"]
    assert len(open(tmp_path / "run" / "results.jsonl").readlines()) == 6


def test_min_pixels_refuses_bad_stage_settings(tmp_path):
    setup = write_tiny_setup(tmp_path / "setup")
    for field, value, message in (
        ("min_pixels.ks", "3,2", "increasing"),
        ("min_pixels.search", "bfgs", "min_pixels.search"),
    ):
        config = tiny_config(setup, method="min_pixels", num_images=2, **{field: value})
        with pytest.raises(InputError, match=message):
            run.run_attack(config, str(tmp_path / f"run_{value}"))


def test_exhaustive_run_summary_and_report(tmp_path):
    from opa_jax import report

    setup = write_tiny_setup(tmp_path / "setup")
    config = tiny_config(
        setup,
        method="exhaustive",
        num_images=4,
        **{"exhaustive.stop": "none", "exhaustive.popsize": 64},
    )
    summary = run.run_attack(config, str(tmp_path / "grid"))
    records = [json.loads(line) for line in open(tmp_path / "grid" / "results.jsonl")]
    assert summary["complete_searches"] == 4 and all(r["search_complete"] for r in records)
    for r in records:  # the image reaches a class iff some candidate fools it
        assert bool(r["classes_reached"]) == r["success"] == (r["fooling_positions"] > 0)
        assert r["true_label"] not in r["classes_reached"]
    reach = np.asarray(summary["reach_pair_counts"])
    assert reach.sum() == sum(len(r["classes_reached"]) for r in records)
    counts = summary["num_target_classes"]
    assert counts == [sum(len(r["classes_reached"]) == n for r in records) for n in range(10)]

    min_config = tiny_config(
        setup,
        method="min_pixels",
        num_images=4,
        **{"min_pixels.ks": "2", "min_pixels.popsize": 8, "min_pixels.generations": 3},
    )
    fewest = run.run_attack(min_config, str(tmp_path / "fewest"))
    path = report.write_report(
        [str(tmp_path / "grid"), str(tmp_path / "fewest")], str(tmp_path / "r")
    )
    text = open(path).read()
    assert "## Exhaustive search: classes reached and vulnerable pixels" in text
    assert "## Minimum pixels" in text and "fooled at k <= 2" in text
    row = next(line for line in text.splitlines() if line.startswith("| fewest | corner_search"))
    cells = row.split(" | ")
    assert cells[3].startswith(f"{fewest['fooled_by_k']['1']} (")
    assert cells[4].startswith(f"{fewest['fooled_by_k']['2']} (")
    assert "exhaustive (corners, stop none)" in text
    assert (tmp_path / "r" / "min_pixels.png").stat().st_size > 0
    assert (tmp_path / "r" / "reached_pairs_grid.png").stat().st_size > 0
    if any(r["fooling_positions"] for r in records):
        assert (tmp_path / "r" / "vulnerable_grid.png").stat().st_size > 0
